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

    /// <summary>A DoRA adapter (use_dora): LoRA of rank <paramref name="rank"/> on <paramref name="targets"/> of every
    /// layer with a magnitude per output near 1. DoRA's cost does not depend on the values; against a real base a
    /// trained magnitude is near the weight rows' norms instead.</summary>
    public static string Dora(string dir, ModelConfig c, int rank, long seed, IReadOnlyList<string>? targets = null)
    {
        targets ??= AllLinear;
        Lora(dir, c, rank, seed, targets);
        var gen = new torch.Generator((ulong)seed + 1);
        var tensors = ReadBack(dir);
        for (int l = 0; l < c.NumLayers; l++)
            foreach (var t in targets)
            {
                var target = Enum.GetValues<LoraTarget>().Single(x => LoraAdapter.ModuleName(x) == t);
                var p = $"base_model.model.model.layers.{l}.{(target <= LoraTarget.O ? "self_attn" : "mlp")}.{t}.";
                tensors.Add(new(p + "lora_magnitude_vector", 1 + 0.1 * torch.randn([LoraAdapter.Shape(target, c).Out], generator: gen)));
            }
        return Write(dir, new { peft_type = "LORA", r = rank, lora_alpha = 2 * rank, target_modules = targets, bias = "none", use_dora = true, task_type = "CAUSAL_LM" }, tensors);
    }

    /// <summary>LoRA of rank <paramref name="rank"/> on <paramref name="targets"/> plus a saved lm_head (modules_to_save):
    /// a whole [V, hidden] matrix of random values.</summary>
    public static string LoraWithSavedLmHead(string dir, ModelConfig c, int rank, long seed, IReadOnlyList<string>? targets = null)
    {
        targets ??= AllLinear;
        Lora(dir, c, rank, seed, targets);
        var tensors = ReadBack(dir);
        tensors.Add(new("base_model.model.lm_head.weight", torch.randn([c.VocabSize, c.HiddenSize], generator: new torch.Generator((ulong)seed + 2)) * 0.02));
        return Write(dir, new { peft_type = "LORA", r = rank, lora_alpha = 2 * rank, target_modules = targets, bias = "none", modules_to_save = new[] { "lm_head" }, task_type = "CAUSAL_LM" }, tensors);
    }

    private static List<KeyValuePair<string, Tensor>> ReadBack(string dir)
    {
        using var file = SafeTensorsFile.Open(Path.Combine(dir, AdapterFolder.WeightsFile));
        return file.Tensors.Select(t => new KeyValuePair<string, Tensor>(t.Name, file.ToTensor(t.Name))).ToList();
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

    /// <summary>P-tuning as PEFT saves it: the prompt encoder's output, stored like prompt-tuning embeddings.</summary>
    public static string PTuning(string dir, ModelConfig c, int virtualTokens, long seed) =>
        Write(dir, new { peft_type = "P_TUNING", num_virtual_tokens = virtualTokens, token_dim = c.HiddenSize, num_transformer_submodules = 1, encoder_reparameterization_type = "MLP", task_type = "CAUSAL_LM" },
            [new("prompt_embeddings", torch.randn([virtualTokens, c.HiddenSize], generator: new torch.Generator((ulong)seed)) * 0.02)]);

    /// <summary>A Houlsby bottleneck adapter (our format, docs/adapter-format.md) after both blocks of every
    /// layer; with <paramref name="experts"/> &gt; 0 an AdaMix adapter with that many experts per module.</summary>
    public static string Bottleneck(string dir, ModelConfig c, int reductionFactor, long seed, int experts = 0)
    {
        var gen = new torch.Generator((ulong)seed);
        long hidden = c.HiddenSize, r = hidden / reductionFactor;
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < c.NumLayers; l++)
            foreach (var block in new[] { "attention_adapter", "mlp_adapter" })
                for (int e = 0; e < Math.Max(1, experts); e++)
                {
                    var p = $"model.layers.{l}.{block}.{(experts > 0 ? $"experts.{e}." : "")}";
                    tensors.Add(new(p + "down.weight", torch.randn([r, hidden], generator: gen) / Math.Sqrt(hidden)));
                    tensors.Add(new(p + "down.bias", torch.randn([r], generator: gen) * 0.01));
                    tensors.Add(new(p + "up.weight", torch.randn([hidden, r], generator: gen) * 0.01));
                    tensors.Add(new(p + "up.bias", torch.randn([hidden], generator: gen) * 0.01));
                }
        object config = experts > 0
            ? new { peft_type = "ADAMIX", reduction_factor = reductionFactor, placement = "both", non_linearity = "gelu", num_experts = experts }
            : new { peft_type = "BOTTLENECK", reduction_factor = reductionFactor, placement = "both", non_linearity = "relu" };
        return Write(dir, config, tensors);
    }

    /// <summary>BitFit: every projection bias of every layer.</summary>
    public static string BitFit(string dir, ModelConfig c, long seed)
    {
        var gen = new torch.Generator((ulong)seed);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        for (int l = 0; l < c.NumLayers; l++)
            foreach (var (module, size) in new[] { ("self_attn.q_proj", (long)c.NumHeads * c.HeadDim), ("self_attn.k_proj", (long)c.NumKvHeads * c.HeadDim),
                         ("self_attn.v_proj", (long)c.NumKvHeads * c.HeadDim), ("self_attn.o_proj", c.HiddenSize), ("mlp.gate_proj", c.IntermediateSize),
                         ("mlp.up_proj", c.IntermediateSize), ("mlp.down_proj", c.HiddenSize) })
                tensors.Add(new($"model.layers.{l}.{module}.bias", torch.randn([size], generator: gen) * 0.01));
        return Write(dir, new { peft_type = "BITFIT" }, tensors);
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
