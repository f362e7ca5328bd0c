using PeftServe.Core.Adapters;
using PeftServe.Server.Api;

namespace PeftServe.Server.Adapters;

/// <summary>The folders that POST /v1/load_lora_adapter may read adapters from (<c>--adapter-roots</c>).
/// A path is accepted only when it is absolute, has no ".." segment, and its real location (every
/// symbolic link on the way resolved) lies inside a root's real location; the adapter's files are
/// checked the same way, so a link inside a root cannot reach out of it either. Nothing else on the
/// server can be read through that endpoint.</summary>
public sealed class AdapterRoots
{
    /// <summary>Files taken from a loaded folder (others, such as tokenizer files, are left where they are).</summary>
    public static readonly string[] AdapterFiles = [AdapterFolder.ConfigFile, AdapterFolder.WeightsFile, "README.md"];

    public AdapterRoots(string? setting)
    {
        Roots = (setting ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(r => RealPath(Path.GetFullPath(r))).Distinct(StringComparer.Ordinal).ToList();
    }

    /// <summary>The roots' real paths.</summary>
    public IReadOnlyList<string> Roots { get; }

    /// <summary>The real path of the adapter folder <paramref name="path"/> names, and its adapter files
    /// (name, real path); an <see cref="ApiException"/> (400, or 404 when there is no adapter there) otherwise.</summary>
    public (string Folder, IReadOnlyList<(string Name, string RealPath)> Files) Resolve(string path)
    {
        if (Roots.Count == 0)
            throw Refused("loading adapters by path is off: the server has no adapter roots (--adapter-roots DIR[:DIR...])");
        if (!Path.IsPathRooted(path))
            throw Refused($"lora_path '{path}' must be an absolute path inside an adapter root ({string.Join(", ", Roots)})");
        if (path.Replace('\\', '/').Split('/').Contains(".."))
            throw Refused($"lora_path '{path}' must not contain '..'");
        string folder;
        try { folder = RealPath(Path.GetFullPath(path)); }
        catch (IOException e) { throw Refused($"lora_path '{path}' cannot be resolved: {e.Message}"); }
        if (!Inside(folder))
            throw Refused($"lora_path '{path}' is not inside an adapter root ({string.Join(", ", Roots)}); symbolic links are followed before this check");
        if (!Directory.Exists(folder) || !File.Exists(Path.Combine(folder, AdapterFolder.ConfigFile)))
            throw new ApiException(404, $"No adapter found at lora_path '{path}' (a folder with {AdapterFolder.ConfigFile})", "lora_path", "adapter_not_found");
        var files = new List<(string, string)>();
        foreach (var name in AdapterFiles)
        {
            var file = Path.Combine(folder, name);
            if (!File.Exists(file)) continue;
            var real = RealPath(file);
            if (!Inside(real)) throw Refused($"'{name}' in lora_path '{path}' links outside the adapter roots");
            files.Add((name, real));
        }
        return (folder, files);
    }

    private static ApiException Refused(string message) => new(400, message, "lora_path", "lora_path_not_allowed");

    private bool Inside(string realPath) =>
        Roots.Any(r => realPath == r || realPath.StartsWith(r.EndsWith('/') ? r : r + "/", StringComparison.Ordinal));

    /// <summary>The path with every symbolic link resolved, component by component (what realpath(3)
    /// does; .NET has no such call). Components that do not exist are kept as they are.</summary>
    internal static string RealPath(string fullPath)
    {
        var pending = fullPath;
        for (int hops = 0; hops < 40; hops++)
        {
            var parts = pending.Split('/', StringSplitOptions.RemoveEmptyEntries);
            var current = "/";
            bool relinked = false;
            for (int i = 0; i < parts.Length && !relinked; i++)
            {
                var next = Path.Combine(current, parts[i]);
                if (new FileInfo(next).LinkTarget is { } target)
                {
                    // Splice the link's target in (relative to the real folder it sits in) and start over.
                    var resolved = Path.IsPathRooted(target) ? target : Path.Combine(current, target);
                    pending = Path.GetFullPath(Path.Combine([resolved, .. parts[(i + 1)..]]));
                    relinked = true;
                }
                else current = next;
            }
            if (!relinked) return current;
        }
        throw new IOException($"too many symbolic links in {fullPath}");
    }
}
