namespace PeftServe.Core.Adapters;

/// <summary>Adapter names that are safe as a folder name in the store (no path separators, no leading dot).</summary>
public static class AdapterNames
{
    public static bool IsSafe(string name) =>
        name.Length is > 0 and <= 128 && name[0] != '.' && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-');
}
