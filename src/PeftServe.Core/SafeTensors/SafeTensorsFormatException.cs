namespace PeftServe.Core.SafeTensors;

/// <summary>A safetensors file (or a sharded checkpoint's index) is malformed, or refers to something
/// it does not hold. The message always names the file and, where one is concerned, the tensor.</summary>
public sealed class SafeTensorsFormatException : Exception
{
    public SafeTensorsFormatException(string filePath, string? tensorName, string problem, Exception? inner = null)
        : base(Compose(filePath, tensorName, problem), inner)
    {
        FilePath = filePath;
        TensorName = tensorName;
    }

    /// <summary>The file the problem is in.</summary>
    public string FilePath { get; }

    /// <summary>The tensor concerned, or null for a problem with the file as a whole.</summary>
    public string? TensorName { get; }

    private static string Compose(string filePath, string? tensorName, string problem) =>
        tensorName is null
            ? $"safetensors file '{filePath}': {problem}"
            : $"safetensors file '{filePath}', tensor '{tensorName}': {problem}";
}
