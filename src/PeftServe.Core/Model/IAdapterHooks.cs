using static TorchSharp.torch;

namespace PeftServe.Core.Model;

/// <summary>The points in a forward pass where parameter-efficient adapters act. The model calls them
/// for the whole batch at once; an implementation applies, row by row, whatever each row's adapter
/// asks for (and leaves other rows alone) in batched tensor operations. The model itself knows nothing
/// about adapter methods or files. Every method returns its input unchanged when it has nothing to do.</summary>
public interface IAdapterHooks
{
    /// <summary>Called with the input of each of layer <paramref name="layer"/>'s frozen projections just before the
    /// projection runs (its result then reaches the matching hook below): an op may start work that only
    /// needs the input, to overlap with the projection.</summary>
    void BeforeLinear(int layer, LinearSite site, Tensor x);

    /// <summary>Whether <see cref="KeysValues"/> may change anything in this pass (prefix tuning's virtual
    /// columns); when not, the cache may rotate and store keys itself.</summary>
    bool ChangesKeysValues { get; }

    /// <summary>The embedding lookup [B,T,hidden] of <paramref name="inputIds"/> [B,T], before <see cref="Embeddings"/>:
    /// LoRA on the embedding adds a per-token delta here, a saved (fully trained) embedding replaces the row's lookup.</summary>
    Tensor TokenEmbeddings(Tensor inputIds, Tensor embeddings);

    /// <summary>Token embeddings [B,T,hidden] of this chunk: virtual-token adapters replace their columns.</summary>
    Tensor Embeddings(Tensor embeddings);

    /// <summary>The fused q|k|v projection output [B,T,(nq+2nkv)*hd] of input <paramref name="x"/>.</summary>
    Tensor Qkv(int layer, Tensor x, Tensor qkv);

    /// <summary><see cref="Qkv"/> with terms owed as in <see cref="AttentionOutputDeferred"/> (the rotary + KV write kernel
    /// applies them, through <see cref="IRotatingKvCache.AttendRotating"/>).</summary>
    (Tensor Output, Kernels.RowEpilogue? Owed) QkvDeferred(int layer, Tensor x, Tensor qkv) => (Qkv(layer, x, qkv), null);

    /// <summary>Rotated keys and values [B,T,nkv,hd] before they enter the KV cache (prefix tuning
    /// writes its per-layer keys and values into its virtual columns here).</summary>
    (Tensor Keys, Tensor Values) KeysValues(int layer, Tensor keys, Tensor values);

    /// <summary>Extra attention output [B,T,nq*hd] to add before the output projection, from rotated
    /// queries [B,nq,T,hd] (LLaMA-Adapter's gated adaption prompts), or null.</summary>
    Tensor? ExtraAttention(int layer, Tensor queries);

    /// <summary>The output projection's result [B,T,hidden] for its input <paramref name="x"/>, before the residual add.</summary>
    Tensor AttentionOutput(int layer, Tensor x, Tensor output);

    /// <summary><see cref="AttentionOutput"/>, except that per-row terms a kernel can apply on the way may be handed back
    /// (<paramref name="output"/> then still lacks them) instead of applied: the caller must apply them, as
    /// <see cref="Kernels.FusedOps.AddRmsNorm"/> does when the output joins the residual stream.</summary>
    (Tensor Output, Kernels.RowEpilogue? Owed) AttentionOutputDeferred(int layer, Tensor x, Tensor output) => (AttentionOutput(layer, x, output), null);

    /// <summary>The fused gate|up projection output [B,T,2*inter] of input <paramref name="x"/>.</summary>
    Tensor GateUp(int layer, Tensor x, Tensor gateUp);

    /// <summary><see cref="GateUp"/> with terms owed as in <see cref="AttentionOutputDeferred"/> (<see cref="Kernels.FusedOps.SiluMul"/> applies them).</summary>
    (Tensor Output, Kernels.RowEpilogue? Owed) GateUpDeferred(int layer, Tensor x, Tensor gateUp) => (GateUp(layer, x, gateUp), null);

    /// <summary>The down projection's input [B,T,inter] (IA3 scales it).</summary>
    Tensor DownInput(int layer, Tensor x);

    /// <summary>The down projection's result [B,T,hidden] for input <paramref name="x"/>, before the residual add.</summary>
    Tensor MlpOutput(int layer, Tensor x, Tensor output);

    /// <summary><see cref="MlpOutput"/> with terms owed as in <see cref="AttentionOutputDeferred"/>.</summary>
    (Tensor Output, Kernels.RowEpilogue? Owed) MlpOutputDeferred(int layer, Tensor x, Tensor output) => (MlpOutput(layer, x, output), null);

    /// <summary>The LM head's logits [B,T,V] of the final-normed hidden states <paramref name="hidden"/> [B,T,hidden]:
    /// LoRA on the LM head adds its delta here, a saved LM head replaces the row's logits.</summary>
    Tensor Logits(Tensor hidden, Tensor logits);
}

/// <summary><see cref="IAdapterHooks"/> that leave every input unchanged: the base of the serving-time
/// batched ops and of the training modules, which override only the hooks where their method acts.</summary>
public abstract class IdentityAdapterHooks : IAdapterHooks
{
    public virtual void BeforeLinear(int layer, LinearSite site, Tensor x) { }
    public virtual bool ChangesKeysValues => false;
    public virtual Tensor TokenEmbeddings(Tensor inputIds, Tensor embeddings) => embeddings;
    public virtual Tensor Embeddings(Tensor embeddings) => embeddings;
    public virtual Tensor Qkv(int layer, Tensor x, Tensor qkv) => qkv;
    public virtual (Tensor Keys, Tensor Values) KeysValues(int layer, Tensor keys, Tensor values) => (keys, values);
    public virtual Tensor? ExtraAttention(int layer, Tensor queries) => null;
    public virtual Tensor AttentionOutput(int layer, Tensor x, Tensor output) => output;
    public virtual Tensor GateUp(int layer, Tensor x, Tensor gateUp) => gateUp;
    public virtual Tensor DownInput(int layer, Tensor x) => x;
    public virtual Tensor MlpOutput(int layer, Tensor x, Tensor output) => output;
    public virtual Tensor Logits(Tensor hidden, Tensor logits) => logits;
}

/// <summary>The decoder layer's frozen projections, in the order they run.</summary>
public enum LinearSite { Qkv, O, GateUp, Down }
