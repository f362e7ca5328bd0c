# Compares PeftServe outputs made on the GPU machine with the Hugging Face reference fixtures.
# usage: python3 compare.py EXPECTED.safetensors logits TAG OUT.safetensors  -> max |diff| of logits_TAG
#        python3 compare.py EXPECTED.safetensors greedy TAG "ids ids ..."   -> tokens equal to greedy_TAG?
import sys
from safetensors.numpy import load_file
exp = load_file(sys.argv[1]); kind, tag = sys.argv[2], sys.argv[3]
if kind == "logits":
    got = load_file(sys.argv[4])["logits"]
    ref = exp["logits_" + tag]
    print(f"logits_{tag}: shape {tuple(got.shape)} max|diff| {abs(got - ref).max():.3g}")
else:
    got = [int(x) for x in sys.argv[4].split()]
    ref = exp["greedy_" + tag][0].tolist()
    print(f"greedy_{tag}: {'EQUAL' if got == ref else 'DIFFERENT'} ours={got} ref={ref}")
