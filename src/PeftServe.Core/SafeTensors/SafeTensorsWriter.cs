using System.Text.Encodings.Web;
using System.Text.Json;
using TorchSharp;

namespace PeftServe.Core.SafeTensors;

/// <summary>Writes safetensors files: little-endian u64 header length, a JSON header (padded with
/// spaces so the data section starts 8-byte aligned), then every tensor's bytes back to back in the
/// order given. The file appears atomically: it is written to a temporary file beside the target,
/// flushed, then moved over it.</summary>
public static class SafeTensorsWriter
{
    internal const int DefaultCopyChunkBytes = 1 << 30;

    /// <summary>Writes <paramref name="tensors"/> (any device; dtypes F32, F16, BF16, I64, I32, U8, I8,
    /// BOOL, F64, I16; any layout) and optional string metadata to <paramref name="path"/>.</summary>
    public static void Write(string path, IEnumerable<KeyValuePair<string, torch.Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata = null) =>
        Write(path, tensors, metadata, DefaultCopyChunkBytes);

    /// <summary><see cref="Write(string, IEnumerable{KeyValuePair{string, torch.Tensor}}, IReadOnlyDictionary{string, string}?)"/>
    /// with each tensor's data written in slices of at most <paramref name="chunkBytes"/> (for tests).</summary>
    internal static void Write(string path, IEnumerable<KeyValuePair<string, torch.Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata, int chunkBytes)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        ArgumentNullException.ThrowIfNull(tensors);
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("safetensors data is little-endian; this machine is not");
        path = Path.GetFullPath(path);

        var entries = new List<(string Name, torch.Tensor Tensor, SafeTensorDType DType, long[] Shape, long Begin, long End)>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        long offset = 0;
        foreach (var (name, tensor) in tensors)
        {
            if (name is null) throw new ArgumentException("a tensor name is null", nameof(tensors));
            if (name == "__metadata__")
                throw new ArgumentException($"writing '{path}': \"__metadata__\" is reserved and cannot name a tensor", nameof(tensors));
            if (!names.Add(name))
                throw new ArgumentException($"writing '{path}': tensor '{name}' is given twice", nameof(tensors));
            if (tensor is null || tensor.IsInvalid)
                throw new ArgumentException($"writing '{path}': tensor '{name}' is null or disposed", nameof(tensors));
            if (!SafeTensorDTypes.TryFromScalarType(tensor.dtype, out var dtype))
                throw new ArgumentException($"writing '{path}': tensor '{name}' has dtype {tensor.dtype}, which safetensors files here cannot hold", nameof(tensors));
            var shape = tensor.shape;
            var length = checked(tensor.numel() * dtype.ElementSize());
            entries.Add((name, tensor, dtype, shape, offset, offset + length));
            offset = checked(offset + length);
        }

        var header = BuildHeader(path, entries.Select(e => (e.Name, e.DType, e.Shape, e.Begin, e.End)), metadata);

        var directory = Path.GetDirectoryName(path)!;
        var temp = Path.Combine(directory, $".{Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> prefix = stackalloc byte[8];
                System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
                stream.Write(prefix);
                stream.Write(header);
                foreach (var e in entries) WriteData(stream, e.Tensor, e.End - e.Begin, chunkBytes);
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }

    /// <summary>Writes a sharded checkpoint into <paramref name="directory"/>: tensors, in the order given,
    /// fill shards named <c>{baseName}-00001-of-0000N.safetensors</c> until the next one would take a shard
    /// past <paramref name="maxShardBytes"/> of data (a larger tensor gets a shard of its own), then
    /// <c>{baseName}.safetensors.index.json</c> with "metadata": {"total_size": ...} and "weight_map".
    /// Readable with <see cref="SafeTensorsCheckpoint.Open"/>. Returns the index's path.</summary>
    public static string WriteSharded(string directory, IEnumerable<KeyValuePair<string, torch.Tensor>> tensors,
        long maxShardBytes, string baseName = "model", IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        ArgumentNullException.ThrowIfNull(tensors);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxShardBytes);
        Directory.CreateDirectory(directory);

        var shards = new List<List<KeyValuePair<string, torch.Tensor>>>();
        List<KeyValuePair<string, torch.Tensor>>? current = null;
        long currentBytes = 0, totalBytes = 0;
        foreach (var kv in tensors)
        {
            if (kv.Value is null || kv.Value.IsInvalid)
                throw new ArgumentException($"writing a sharded checkpoint in '{directory}': tensor '{kv.Key}' is null or disposed", nameof(tensors));
            var bytes = checked(kv.Value.numel() * kv.Value.element_size());
            if (current is null || (current.Count > 0 && currentBytes + bytes > maxShardBytes))
            {
                current = [];
                shards.Add(current);
                currentBytes = 0;
            }
            current.Add(kv);
            currentBytes += bytes;
            totalBytes = checked(totalBytes + bytes);
        }
        if (shards.Count == 0) shards.Add([]);

        var weightMap = new List<KeyValuePair<string, string>>();
        for (var i = 0; i < shards.Count; i++)
        {
            var shardName = $"{baseName}-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
            Write(Path.Combine(directory, shardName), shards[i], metadata);
            foreach (var kv in shards[i]) weightMap.Add(new(kv.Key, shardName));
        }

        var indexPath = Path.GetFullPath(Path.Combine(directory, baseName + ".safetensors.index.json"));
        var temp = indexPath + $".{Guid.NewGuid():N}.tmp";
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
            using (var json = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
            {
                json.WriteStartObject();
                json.WriteStartObject("metadata");
                json.WriteNumber("total_size", totalBytes);
                json.WriteEndObject();
                json.WriteStartObject("weight_map");
                foreach (var (name, shard) in weightMap) json.WriteString(name, shard);
                json.WriteEndObject();
                json.WriteEndObject();
            }
            File.Move(temp, indexPath, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
        return indexPath;
    }

    private static byte[] BuildHeader(string path,
        IEnumerable<(string Name, SafeTensorDType DType, long[] Shape, long Begin, long End)> entries,
        IReadOnlyDictionary<string, string>? metadata)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = false, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            json.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                json.WriteStartObject("__metadata__");
                foreach (var (key, value) in metadata)
                {
                    if (key is null || value is null)
                        throw new ArgumentException($"writing '{path}': metadata keys and values must not be null", nameof(metadata));
                    json.WriteString(key, value);
                }
                json.WriteEndObject();
            }
            foreach (var (name, dtype, shape, begin, end) in entries)
            {
                json.WriteStartObject(name);
                json.WriteString("dtype", dtype.HeaderName());
                json.WriteStartArray("shape");
                foreach (var d in shape) json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(begin);
                json.WriteNumberValue(end);
                json.WriteEndArray();
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        // Pad with spaces (allowed by the format) so the data section starts on an 8-byte boundary.
        var padding = (int)((8 - buffer.Length % 8) % 8);
        for (var i = 0; i < padding; i++) buffer.WriteByte((byte)' ');
        return buffer.ToArray();
    }

    private static void WriteData(Stream stream, torch.Tensor tensor, long byteLength, int chunkBytes)
    {
        if (byteLength == 0) return;
        var cpu = tensor.cpu();
        torch.Tensor? contiguous = null;
        try
        {
            contiguous = cpu.contiguous();
            if (byteLength <= chunkBytes)
            {
                stream.Write(contiguous.bytes);
                return;
            }
            using var flat = contiguous.view(-1);
            var elementSize = (int)contiguous.element_size();
            var count = contiguous.numel();
            var chunkElements = Math.Max(1, chunkBytes / elementSize);
            for (long start = 0; start < count; start += chunkElements)
            {
                using var slice = flat.narrow(0, start, Math.Min(chunkElements, count - start));
                stream.Write(slice.bytes);
            }
        }
        finally
        {
            if (contiguous is not null && !ReferenceEquals(contiguous, cpu) && !ReferenceEquals(contiguous, tensor))
                contiguous.Dispose();
            if (!ReferenceEquals(cpu, tensor)) cpu.Dispose();
        }
    }
}
