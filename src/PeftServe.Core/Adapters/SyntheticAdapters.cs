using System.Text.Json;
using PeftServe.Core.Adapters.Lora;
using PeftServe.Core.Model;
using PeftServe.Core.SafeTensors;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Adapters;

/// <summary>Writes adapters with random weights in PEFT's format for a given base shape: for benchmarks
/// at real sizes and for tests, where no trained adapters exist.</summary>
public static class SyntheticAdapters
{
    public static readonly string[] AllLinear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>A LoRA adapter of rank <paramref name="rank"/> on <paramref name="targets"/> of every layer.</summary>
    public static string Lora(string dir, ModelConfig c, int rank, long seed, IReadOnlyList<string>? targets = null)
    {
        targets ??= AllLinear;
        var gen = new torch.Generator((ulong)seed);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < c.NumLayers; l++)
            foreach (var t in targets)
            {
                var target = Enum.GetValues<LoraTarget>().Single(x => LoraAdapter.ModuleName(x) == t);
                var (inF, outF) = LoraAdapter.Shape(target, c);
                var p = $"base_model.model.model.layers.{l}.{(target <= LoraTarget.O ? "self_attn" : "mlp")}.{t}.";
                tensors.Add(new(p + "lora_A.weight", torch.randn([rank, inF], generator: gen) / Math.Sqrt(inF)));
                tensors.Add(new(p + "lora_B.weight", torch.randn([outF, rank], generator: gen) * 0.02));
            }
        return Write(dir, new { peft_type = "LORA", r = rank, lora_alpha = 2 * rank, target_modules = targets, bias = "none", task_type = "CAUSAL_LM" }, tensors);
    }

    public static string Prefix(string dir, ModelConfig c, int virtualTokens, long seed) =>
        Write(dir, new { peft_type = "PREFIX_TUNING", num_virtual_tokens = virtualTokens, num_layers = c.NumLayers, token_dim = c.NumKvHeads * c.HeadDim, num_transformer_submodules = 1, task_type = "CAUSAL_LM" },
            [new("prompt_embeddings", torch.randn([virtualTokens, 2L * c.NumLayers * c.NumKvHeads * c.HeadDim], generator: new torch.Generator((ulong)seed)))]);

    public static string PromptTuning(string dir, ModelConfig c, int virtualTokens, long seed) =>
        Write(dir, new { peft_type = "PROMPT_TUNING", num_virtual_tokens = virtualTokens, token_dim = c.HiddenSize, num_transformer_submodules = 1, task_type = "CAUSAL_LM" },
            [new("prompt_embeddings", torch.randn([virtualTokens, c.HiddenSize], generator: new torch.Generator((ulong)seed)) * 0.02)]);

    public static string IA3(string dir, ModelConfig c, long seed)
    {
        var gen = new torch.Generator((ulong)seed);
        long kv = (long)c.NumKvHeads * c.HeadDim;
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < c.NumLayers; l++)
        {
            var p = $"base_model.model.model.layers.{l}.";
            tensors.Add(new(p + "self_attn.k_proj.ia3_l", 1 + 0.1 * torch.randn([kv, 1], generator: gen)));
            tensors.Add(new(p + "self_attn.v_proj.ia3_l", 1 + 0.1 * torch.randn([kv, 1], generator: gen)));
            tensors.Add(new(p + "mlp.down_proj.ia3_l", 1 + 0.1 * torch.randn([1, c.IntermediateSize], generator: gen)));
        }
        return Write(dir, new { peft_type = "IA3", target_modules = new[] { "k_proj", "v_proj", "down_proj" }, feedforward_modules = new[] { "down_proj" }, task_type = "CAUSAL_LM" }, tensors);
    }

    public static string LlamaAdapter(string dir, ModelConfig c, int length, int layers, long seed)
    {
        var gen = new torch.Generator((ulong)seed);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = c.NumLayers - layers; l < c.NumLayers; l++)
        {
            tensors.Add(new($"base_model.model.model.layers.{l}.self_attn.adaption_prompt", torch.randn([1, length, c.HiddenSize], generator: gen)));
            tensors.Add(new($"base_model.model.model.layers.{l}.self_attn.adaption_gate", torch.randn([1], generator: gen) * 0.1));
        }
        return Write(dir, new { peft_type = "ADAPTION_PROMPT", adapter_len = length, adapter_layers = layers, target_modules = "self_attn", task_type = "CAUSAL_LM" }, tensors);
    }

    /// <summary>adapter_config.json + adapter_model.safetensors in <paramref name="dir"/> (created).</summary>
    public static string Write(string dir, object config, IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, AdapterFolder.ConfigFile), JsonSerializer.Serialize(config, new JsonSerializerOptions { WriteIndented = true }));
        var list = tensors.ToList();
        SafeTensorsWriter.Write(Path.Combine(dir, AdapterFolder.WeightsFile), list, new Dictionary<string, string> { ["format"] = "pt" });
        foreach (var t in list) t.Value.Dispose();
        return dir;
    }
}
