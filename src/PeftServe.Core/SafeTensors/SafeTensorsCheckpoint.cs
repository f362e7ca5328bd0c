using System.Text.Json;
using TorchSharp;

namespace PeftServe.Core.SafeTensors;

/// <summary>A set of weights in safetensors form: a single file, or a folder holding either
/// <c>{baseName}.safetensors</c> or <c>{baseName}.safetensors.index.json</c> plus the shards its
/// "weight_map" names. Every file is opened (and its header validated) up front, and every tensor the
/// index lists is checked to be present in its shard.</summary>
public sealed class SafeTensorsCheckpoint : IDisposable
{
    private readonly List<SafeTensorsFile> _files;
    private readonly Dictionary<string, SafeTensorsFile> _fileOf;
    private readonly List<string> _names;

    private SafeTensorsCheckpoint(string path, List<SafeTensorsFile> files, Dictionary<string, SafeTensorsFile> fileOf,
        List<string> names, IReadOnlyDictionary<string, string> metadata)
    {
        Path = path;
        _files = files;
        _fileOf = fileOf;
        _names = names;
        Metadata = metadata;
    }

    /// <summary>The single safetensors file, or the index file of a sharded checkpoint.</summary>
    public string Path { get; }

    /// <summary>True when read through an index.json.</summary>
    public bool IsSharded => Path.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase);

    /// <summary>The files the checkpoint is made of (one, or the shards in index order).</summary>
    public IReadOnlyList<SafeTensorsFile> Files => _files;

    /// <summary>A single file's "__metadata__", or an index's "metadata" (non-string values as their JSON text).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Every tensor name, in header (or weight_map) order.</summary>
    public IReadOnlyCollection<string> Names => _names;

    public bool Contains(string name) => _fileOf.ContainsKey(name);

    public SafeTensorInfo Info(string name) => FileOf(name).Info(name);

    /// <summary>The file a tensor lives in.</summary>
    public SafeTensorsFile FileOf(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (_fileOf.TryGetValue(name, out var file)) return file;
        throw new KeyNotFoundException($"safetensors checkpoint '{Path}' holds no tensor '{name}' ({_names.Count} tensors)");
    }

    public ReadOnlySpan<byte> GetBytes(string name) => FileOf(name).GetBytes(name);

    public torch.Tensor ToTensor(string name, torch.Device? device = null, torch.ScalarType? dtype = null) =>
        FileOf(name).ToTensor(name, device, dtype);

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
    }

    public override string ToString() => $"{Path} ({_names.Count} tensors in {_files.Count} files)";

    /// <summary>Opens a single file (a path to a .safetensors file), an index (a path to an .index.json),
    /// or a folder holding <c>{baseName}.safetensors</c> (preferred) or <c>{baseName}.safetensors.index.json</c>.
    /// Use baseName "adapter_model" for PEFT adapters.</summary>
    public static SafeTensorsCheckpoint Open(string pathOrDirectory, string baseName = "model")
    {
        ArgumentException.ThrowIfNullOrEmpty(pathOrDirectory);
        ArgumentException.ThrowIfNullOrEmpty(baseName);
        var full = System.IO.Path.GetFullPath(pathOrDirectory);
        if (File.Exists(full))
            return full.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase) ? OpenIndex(full) : OpenSingle(full);
        if (!Directory.Exists(full))
            throw new FileNotFoundException($"no safetensors file or folder at '{full}'", full);

        var single = System.IO.Path.Combine(full, baseName + ".safetensors");
        if (File.Exists(single)) return OpenSingle(single);
        var index = System.IO.Path.Combine(full, baseName + ".safetensors.index.json");
        if (File.Exists(index)) return OpenIndex(index);
        throw new FileNotFoundException(
            $"folder '{full}' holds neither {baseName}.safetensors nor {baseName}.safetensors.index.json", single);
    }

    private static SafeTensorsCheckpoint OpenSingle(string path)
    {
        var file = SafeTensorsFile.Open(path);
        var fileOf = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
        var names = new List<string>(file.Tensors.Count);
        foreach (var t in file.Tensors)
        {
            fileOf.Add(t.Name, file);
            names.Add(t.Name);
        }
        return new SafeTensorsCheckpoint(path, [file], fileOf, names, file.Metadata);
    }

    private static SafeTensorsCheckpoint OpenIndex(string indexPath)
    {
        var (weightMap, metadata) = ReadIndex(indexPath);
        var folder = System.IO.Path.GetDirectoryName(indexPath)!;
        var files = new List<SafeTensorsFile>();
        var byShard = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
        var fileOf = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
        var names = new List<string>(weightMap.Count);
        try
        {
            foreach (var (name, shard) in weightMap)
            {
                if (!byShard.TryGetValue(shard, out var file))
                {
                    var shardPath = ResolveShard(indexPath, folder, name, shard);
                    if (!File.Exists(shardPath))
                        throw new SafeTensorsFormatException(indexPath, name,
                            $"weight_map puts it in shard '{shard}', but '{shardPath}' does not exist");
                    file = SafeTensorsFile.Open(shardPath);
                    files.Add(file);
                    byShard.Add(shard, file);
                }
                if (!file.Contains(name))
                    throw new SafeTensorsFormatException(file.Path, name,
                        $"the index '{indexPath}' puts this tensor in this shard, but the shard does not hold it");
                fileOf.Add(name, file);
                names.Add(name);
            }
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
        return new SafeTensorsCheckpoint(indexPath, files, fileOf, names, metadata);
    }

    private static string ResolveShard(string indexPath, string folder, string tensor, string shard)
    {
        if (shard.Length == 0 || System.IO.Path.IsPathRooted(shard))
            throw new SafeTensorsFormatException(indexPath, tensor,
                $"weight_map shard '{shard}' must be a file name relative to the index's folder");
        var resolved = System.IO.Path.GetFullPath(System.IO.Path.Combine(folder, shard));
        var root = System.IO.Path.TrimEndingDirectorySeparator(folder) + System.IO.Path.DirectorySeparatorChar;
        if (!resolved.StartsWith(root, StringComparison.Ordinal))
            throw new SafeTensorsFormatException(indexPath, tensor,
                $"weight_map shard '{shard}' points outside the index's folder");
        return resolved;
    }

    private static (List<KeyValuePair<string, string>> WeightMap, Dictionary<string, string> Metadata) ReadIndex(string indexPath)
    {
        JsonDocument doc;
        try
        {
            using var stream = File.OpenRead(indexPath);
            doc = JsonDocument.Parse(stream);
        }
        catch (JsonException e)
        {
            throw new SafeTensorsFormatException(indexPath, null, $"the index is not valid JSON: {e.Message}", e);
        }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new SafeTensorsFormatException(indexPath, null, "the index is not a JSON object");
            if (!root.TryGetProperty("weight_map", out var map))
                throw new SafeTensorsFormatException(indexPath, null, "the index has no \"weight_map\"");
            if (map.ValueKind != JsonValueKind.Object)
                throw new SafeTensorsFormatException(indexPath, null, "the index's \"weight_map\" is not a JSON object");

            var weightMap = new List<KeyValuePair<string, string>>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var entry in map.EnumerateObject())
            {
                if (entry.Value.ValueKind != JsonValueKind.String)
                    throw new SafeTensorsFormatException(indexPath, entry.Name,
                        "its weight_map value is not a string (a shard file name)");
                if (!seen.Add(entry.Name))
                    throw new SafeTensorsFormatException(indexPath, entry.Name, "weight_map lists this tensor twice");
                weightMap.Add(new(entry.Name, entry.Value.GetString()!));
            }

            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            if (root.TryGetProperty("metadata", out var meta))
            {
                if (meta.ValueKind == JsonValueKind.Object)
                {
                    foreach (var kv in meta.EnumerateObject())
                        metadata[kv.Name] = kv.Value.ValueKind == JsonValueKind.String ? kv.Value.GetString()! : kv.Value.GetRawText();
                }
                else if (meta.ValueKind != JsonValueKind.Null)
                {
                    throw new SafeTensorsFormatException(indexPath, null, "the index's \"metadata\" is not a JSON object");
                }
            }
            return (weightMap, metadata);
        }
    }
}
