using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using TorchSharp;

namespace PeftServe.Core.SafeTensors;

/// <summary>A read-only, memory-mapped safetensors file. <see cref="Open"/> parses and validates the
/// whole header (types, shapes, sizes, ranges, overlaps) before anything in it is trusted; after that,
/// <see cref="GetBytes"/> is a zero-copy view of the mapping and <see cref="ToTensor"/> makes exactly
/// one copy into a fresh CPU tensor. Thread-safe for concurrent reads. Spans from GetBytes must not be
/// used after <see cref="Dispose"/>; every method called after Dispose throws ObjectDisposedException.</summary>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    /// <summary>Headers larger than this are refused: real ones are kilobytes to a few megabytes.</summary>
    public const ulong MaxHeaderLength = 100_000_000;

    private const string MetadataKey = "__metadata__";

    /// <summary>Largest single copy; tensors beyond it are copied in slices so no span exceeds int range.</summary>
    internal const int DefaultCopyChunkBytes = 1 << 30;

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _data;          // start of the data section
    private readonly long _dataLength;
    private readonly Dictionary<string, SafeTensorInfo> _byName;
    private int _disposed;

    private SafeTensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, byte* data, long dataLength,
        IReadOnlyDictionary<string, string> metadata, List<SafeTensorInfo> tensors, long headerLength)
    {
        Path = path;
        _map = map;
        _view = view;
        _data = data;
        _dataLength = dataLength;
        Metadata = metadata;
        Tensors = tensors.AsReadOnly();
        HeaderLength = headerLength;
        _byName = new Dictionary<string, SafeTensorInfo>(tensors.Count, StringComparer.Ordinal);
        foreach (var t in tensors) _byName.Add(t.Name, t);
    }

    /// <summary>The file, as given to <see cref="Open"/> (made absolute).</summary>
    public string Path { get; }

    /// <summary>The header's "__metadata__" (empty when absent).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Every tensor, in header order.</summary>
    public IReadOnlyList<SafeTensorInfo> Tensors { get; }

    /// <summary>Length of the JSON header in bytes; the data section starts at 8 + HeaderLength.</summary>
    public long HeaderLength { get; }

    public bool Contains(string name) => _byName.ContainsKey(name);

    /// <summary>The header entry of <paramref name="name"/>; KeyNotFoundException naming file and tensor if absent.</summary>
    public SafeTensorInfo Info(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (_byName.TryGetValue(name, out var info)) return info;
        throw new KeyNotFoundException($"safetensors file '{Path}' holds no tensor '{name}' ({_byName.Count} tensors)");
    }

    /// <summary>The tensor's raw little-endian bytes: a view of the mapping, valid until Dispose.</summary>
    public ReadOnlySpan<byte> GetBytes(string name)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        var info = Info(name);
        if (info.ByteLength > int.MaxValue)
            throw new NotSupportedException(
                $"safetensors file '{Path}', tensor '{name}': {info.ByteLength} bytes do not fit one span; use ToTensor");
        return new ReadOnlySpan<byte>(_data + info.Begin, (int)info.ByteLength);
    }

    /// <summary>Copies the tensor once into a new CPU tensor of the file's dtype, then converts it with
    /// .to(dtype) / .to(device) only where those differ from what was loaded. The caller owns the result.</summary>
    public torch.Tensor ToTensor(string name, torch.Device? device = null, torch.ScalarType? dtype = null) =>
        ToTensor(name, device, dtype, DefaultCopyChunkBytes);

    /// <summary><see cref="ToTensor(string, torch.Device?, torch.ScalarType?)"/> with the copy split into
    /// slices of at most <paramref name="chunkBytes"/> (tests use small ones to exercise the slicing).</summary>
    internal torch.Tensor ToTensor(string name, torch.Device? device, torch.ScalarType? dtype, int chunkBytes)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        var info = Info(name);
        var tensor = torch.empty(info.Shape, dtype: info.DType.ToScalarType(), device: torch.CPU);
        try
        {
            CopyInto(info, tensor, chunkBytes);
            var convert = dtype is { } wanted && wanted != tensor.dtype;
            var move = device is not null && device.type != DeviceType.CPU;
            if (convert || move)
            {
                var converted = tensor.to(dtype ?? tensor.dtype, device ?? torch.CPU);
                tensor.Dispose();
                tensor = converted;
            }
            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    /// <summary>Whether every value of a floating-point tensor is finite, read from the raw bytes
    /// (no conversion, no copy): an exponent of all ones is NaN or infinity in every IEEE format.
    /// Integer and boolean tensors are always finite.</summary>
    public bool AllFinite(string name)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        var info = Info(name);
        var handle = _view.SafeMemoryMappedViewHandle;
        var added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            byte* p = _data + info.Begin;
            long n = info.ElementCount;
            switch (info.DType)
            {
                case SafeTensorDType.F32:
                    for (long i = 0; i < n; i++) if ((((uint*)p)[i] & 0x7F80_0000u) == 0x7F80_0000u) return false;
                    return true;
                case SafeTensorDType.F16:
                    for (long i = 0; i < n; i++) if ((((ushort*)p)[i] & 0x7C00) == 0x7C00) return false;
                    return true;
                case SafeTensorDType.BF16:
                    for (long i = 0; i < n; i++) if ((((ushort*)p)[i] & 0x7F80) == 0x7F80) return false;
                    return true;
                case SafeTensorDType.F64:
                    for (long i = 0; i < n; i++) if ((((ulong*)p)[i] & 0x7FF0_0000_0000_0000ul) == 0x7FF0_0000_0000_0000ul) return false;
                    return true;
                default:
                    return true;
            }
        }
        finally
        {
            if (added) handle.DangerousRelease();
        }
    }

    private void CopyInto(SafeTensorInfo info, torch.Tensor tensor, int chunkBytes)
    {
        var total = info.ByteLength;
        if (total == 0) return;
        // Hold a reference on the view so a concurrent Dispose cannot unmap it mid-copy.
        var handle = _view.SafeMemoryMappedViewHandle;
        var added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            var src = _data + info.Begin;
            if (total <= chunkBytes)
            {
                new ReadOnlySpan<byte>(src, (int)total).CopyTo(tensor.bytes);
                return;
            }
            var elementSize = info.DType.ElementSize();
            var chunkElements = Math.Max(1, chunkBytes / elementSize);
            var count = info.ElementCount;
            using var flat = tensor.view(-1);
            for (long start = 0; start < count; start += chunkElements)
            {
                var n = Math.Min(chunkElements, count - start);
                using var slice = flat.narrow(0, start, n);
                new ReadOnlySpan<byte>(src + start * elementSize, checked((int)(n * elementSize))).CopyTo(slice.bytes);
            }
        }
        catch (ObjectDisposedException)
        {
            throw new ObjectDisposedException(nameof(SafeTensorsFile), $"safetensors file '{Path}' was disposed");
        }
        finally
        {
            if (added) handle.DangerousRelease();
        }
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _map.Dispose();
    }

    public override string ToString() => $"{Path} ({Tensors.Count} tensors)";

    /// <summary>Maps <paramref name="path"/> read-only and validates its header; throws
    /// <see cref="SafeTensorsFormatException"/> (naming the file and tensor) for anything malformed.</summary>
    public static SafeTensorsFile Open(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("safetensors data is little-endian; this machine is not");
        path = System.IO.Path.GetFullPath(path);
        // FileShare.Delete lets a writer replace the file (temp + move) while it is mapped here.
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete);
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        var pointerAcquired = false;
        try
        {
            var fileLength = stream.Length;
            if (fileLength < 8)
                throw new SafeTensorsFormatException(path, null,
                    $"the file is {fileLength} bytes long, shorter than the 8-byte header length prefix");
            map = MemoryMappedFile.CreateFromFile(stream, mapName: null, capacity: 0, MemoryMappedFileAccess.Read,
                HandleInheritability.None, leaveOpen: false);
            stream = null;   // owned by the map now
            view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            byte* basePtr = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
            pointerAcquired = true;
            basePtr += view.PointerOffset;

            var rawHeaderLength = System.Buffers.Binary.BinaryPrimitives.ReadUInt64LittleEndian(new ReadOnlySpan<byte>(basePtr, 8));
            if (rawHeaderLength > MaxHeaderLength)
                throw new SafeTensorsFormatException(path, null,
                    $"the header length prefix says {rawHeaderLength} bytes, more than the {MaxHeaderLength}-byte limit");
            var headerLength = (long)rawHeaderLength;
            if (8 + headerLength > fileLength)
                throw new SafeTensorsFormatException(path, null,
                    $"the header length prefix says {headerLength} bytes but only {fileLength - 8} follow it");

            var dataLength = fileLength - 8 - headerLength;
            var (metadata, tensors) = ParseHeader(path, new ReadOnlySpan<byte>(basePtr + 8, (int)headerLength), dataLength);
            var file = new SafeTensorsFile(path, map, view, basePtr + 8 + headerLength, dataLength, metadata, tensors, headerLength);
            return file;
        }
        catch
        {
            if (pointerAcquired) view!.SafeMemoryMappedViewHandle.ReleasePointer();
            view?.Dispose();
            map?.Dispose();
            stream?.Dispose();
            throw;
        }
    }

    /// <summary>Parses and validates a header against a data section of <paramref name="dataLength"/> bytes.</summary>
    internal static (IReadOnlyDictionary<string, string> Metadata, List<SafeTensorInfo> Tensors) ParseHeader(
        string path, ReadOnlySpan<byte> header, long dataLength)
    {
        string json;
        try
        {
            json = StrictUtf8.GetString(header);
        }
        catch (DecoderFallbackException e)
        {
            throw new SafeTensorsFormatException(path, null, "the header is not valid UTF-8", e);
        }

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(json, new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (JsonException e)
        {
            throw new SafeTensorsFormatException(path, null, $"the header is not valid JSON: {e.Message}", e);
        }

        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new SafeTensorsFormatException(path, null, $"the header is a JSON {Kind(root)}, not an object");

            IReadOnlyDictionary<string, string> metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var tensors = new List<SafeTensorInfo>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            var metadataSeen = false;
            foreach (var entry in root.EnumerateObject())
            {
                if (entry.Name == MetadataKey)
                {
                    if (metadataSeen)
                        throw new SafeTensorsFormatException(path, null, $"the header holds \"{MetadataKey}\" twice");
                    metadataSeen = true;
                    metadata = ParseMetadata(path, entry.Value);
                    continue;
                }
                if (!seen.Add(entry.Name))
                    throw new SafeTensorsFormatException(path, entry.Name, "the header lists this tensor twice");
                tensors.Add(ParseEntry(path, entry.Name, entry.Value, dataLength));
            }

            // As the format's own reader requires: the tensors tile the data section exactly, in offset
            // order, with no overlap, no gap and nothing after the last one (bytes no header entry
            // accounts for could hide anything). Empty tensors take no room.
            var ordered = tensors.OrderBy(t => t.Begin).ThenBy(t => t.End).ToList();
            long covered = 0;
            SafeTensorInfo? previous = null;
            foreach (var cur in ordered)
            {
                if (cur.Begin < covered)
                    throw new SafeTensorsFormatException(path, cur.Name,
                        $"data_offsets [{cur.Begin}, {cur.End}] overlap those of tensor '{previous!.Name}' [{previous.Begin}, {previous.End}]");
                if (cur.Begin > covered)
                    throw new SafeTensorsFormatException(path, cur.Name,
                        $"data_offsets [{cur.Begin}, {cur.End}] leave a gap of {cur.Begin - covered} bytes after the previous tensor's data");
                covered = cur.End;
                if (cur.End > cur.Begin) previous = cur;
            }
            if (covered != dataLength)
                throw new SafeTensorsFormatException(path, null,
                    $"the data section holds {dataLength} bytes but the tensors account for {covered}; trailing bytes are refused");
            return (metadata, tensors);
        }
    }

    private static Dictionary<string, string> ParseMetadata(string path, JsonElement value)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw new SafeTensorsFormatException(path, null,
                $"\"{MetadataKey}\" is a JSON {Kind(value)}; it must be an object of strings");
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var kv in value.EnumerateObject())
        {
            if (kv.Value.ValueKind != JsonValueKind.String)
                throw new SafeTensorsFormatException(path, null,
                    $"\"{MetadataKey}\" entry '{kv.Name}' is a JSON {Kind(kv.Value)}; metadata values must be strings");
            if (!metadata.TryAdd(kv.Name, kv.Value.GetString()!))
                throw new SafeTensorsFormatException(path, null, $"\"{MetadataKey}\" holds key '{kv.Name}' twice");
        }
        return metadata;
    }

    private static SafeTensorInfo ParseEntry(string path, string name, JsonElement value, long dataLength)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw new SafeTensorsFormatException(path, name, $"the header entry is a JSON {Kind(value)}, not an object");

        if (!value.TryGetProperty("dtype", out var dtypeElement))
            throw new SafeTensorsFormatException(path, name, "the header entry has no \"dtype\"");
        if (dtypeElement.ValueKind != JsonValueKind.String)
            throw new SafeTensorsFormatException(path, name, $"\"dtype\" is a JSON {Kind(dtypeElement)}, not a string");
        var dtypeName = dtypeElement.GetString();
        if (!SafeTensorDTypes.TryParse(dtypeName, out var dtype))
            throw new SafeTensorsFormatException(path, name,
                $"dtype \"{dtypeName}\" is not supported (supported: {string.Join(", ", Enum.GetValues<SafeTensorDType>().Select(d => d.HeaderName()))})");

        if (!value.TryGetProperty("shape", out var shapeElement))
            throw new SafeTensorsFormatException(path, name, "the header entry has no \"shape\"");
        if (shapeElement.ValueKind != JsonValueKind.Array)
            throw new SafeTensorsFormatException(path, name, $"\"shape\" is a JSON {Kind(shapeElement)}, not an array");
        var shape = new long[shapeElement.GetArrayLength()];
        var k = 0;
        foreach (var dim in shapeElement.EnumerateArray())
        {
            if (dim.ValueKind != JsonValueKind.Number || !dim.TryGetInt64(out var d))
                throw new SafeTensorsFormatException(path, name,
                    $"\"shape\" element {k} ({dim.GetRawText()}) is not an integer");
            if (d < 0)
                throw new SafeTensorsFormatException(path, name, $"\"shape\" element {k} is negative ({d})");
            shape[k++] = d;
        }

        if (!value.TryGetProperty("data_offsets", out var offsetsElement))
            throw new SafeTensorsFormatException(path, name, "the header entry has no \"data_offsets\"");
        if (offsetsElement.ValueKind != JsonValueKind.Array || offsetsElement.GetArrayLength() != 2)
            throw new SafeTensorsFormatException(path, name,
                $"\"data_offsets\" must be an array [begin, end], not {Truncate(offsetsElement.GetRawText())}");
        var begin = ReadOffset(path, name, offsetsElement[0], "begin");
        var end = ReadOffset(path, name, offsetsElement[1], "end");
        if (begin > end)
            throw new SafeTensorsFormatException(path, name, $"data_offsets [{begin}, {end}] have begin after end");

        long byteLength;
        try
        {
            long count = 1;
            foreach (var d in shape) count = checked(count * d);
            byteLength = checked(count * dtype.ElementSize());
        }
        catch (OverflowException e)
        {
            throw new SafeTensorsFormatException(path, name,
                $"shape [{string.Join(", ", shape)}] of {dtype.HeaderName()} overflows a 64-bit byte count", e);
        }
        if (end - begin != byteLength)
            throw new SafeTensorsFormatException(path, name,
                $"data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype.HeaderName()}[{string.Join(", ", shape)}] needs {byteLength}");
        if (end > dataLength)
            throw new SafeTensorsFormatException(path, name,
                $"data_offsets [{begin}, {end}] run past the end of the data section ({dataLength} bytes)");

        return new SafeTensorInfo(name, dtype, shape, begin, end);
    }

    private static long ReadOffset(string path, string name, JsonElement element, string which)
    {
        if (element.ValueKind != JsonValueKind.Number || !element.TryGetInt64(out var v) || v < 0)
            throw new SafeTensorsFormatException(path, name,
                $"data_offsets {which} ({Truncate(element.GetRawText())}) is not a non-negative integer");
        return v;
    }

    private static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "object",
        JsonValueKind.Array => "array",
        JsonValueKind.String => "string",
        JsonValueKind.Number => "number",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        JsonValueKind.Null => "null",
        _ => e.ValueKind.ToString(),
    };

    private static string Truncate(string s) => s.Length <= 80 ? s : s[..77] + "...";
}
