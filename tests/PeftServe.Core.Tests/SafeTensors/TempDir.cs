using System.Buffers.Binary;
using System.Text;

namespace PeftServe.Core.Tests.SafeTensors;

/// <summary>A fresh folder under the system temp folder, deleted on Dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path);

    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "peftserve-st-" + Guid.NewGuid().ToString("N"));

    public string File(string name) => System.IO.Path.Combine(Path, name);

    /// <summary>Writes a hand-made safetensors file: the u64 length prefix, <paramref name="header"/>'s
    /// bytes, then <paramref name="dataLength"/> bytes of data (0, 1, 2, ... mod 256).</summary>
    public string Craft(string name, byte[] header, long dataLength, ulong? lengthPrefix = null)
    {
        var path = File(name);
        using var s = new FileStream(path, FileMode.Create, FileAccess.Write);
        Span<byte> prefix = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, lengthPrefix ?? (ulong)header.Length);
        s.Write(prefix);
        s.Write(header);
        for (long i = 0; i < dataLength; i++) s.WriteByte((byte)i);
        return path;
    }

    public string Craft(string name, string header, long dataLength, ulong? lengthPrefix = null) =>
        Craft(name, Encoding.UTF8.GetBytes(header), dataLength, lengthPrefix);

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
