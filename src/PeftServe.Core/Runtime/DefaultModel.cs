namespace PeftServe.Core.Runtime;

/// <summary>The model used when none is named: the tiny random Llama from the test fixtures, shipped
/// beside the binaries as default-model/. It has a real tokenizer and chat template, so every path of
/// the product runs end to end, but its weights are random and its text is gibberish.</summary>
public static class DefaultModel
{
    public static string Directory => Path.Combine(AppContext.BaseDirectory, "default-model");

    public const string Notice =
        "No model given: serving the built-in tiny Llama (random weights; its text is meaningless). " +
        "Point --model at a Hugging Face model folder for real output, e.g. TinyLlama-1.1B-Chat, SmolLM2, " +
        "Qwen2.5-0.5B-Instruct or Llama-3.2-1B-Instruct (config.json, model.safetensors, tokenizer.json).";

    /// <summary>The folder to load: the one given, or the default (flagged so callers can say so).</summary>
    public static (string Path, bool IsDefault) Resolve(string? modelDir) =>
        string.IsNullOrWhiteSpace(modelDir) ? (Directory, true) : (System.IO.Path.GetFullPath(modelDir), false);
}
