using System.Buffers.Binary;
using System.IO.Compression;
using System.IO.Hashing;
using System.Text;

namespace PeftServe.Core.Adapters;

/// <summary>Limits an uploaded archive must stay within.</summary>
public sealed record ArchiveLimits
{
    /// <summary>Bytes of file data all entries together may unpack to.</summary>
    public long MaxBytes { get; init; } = 512L << 20;
    /// <summary>Files and folders the archive may hold.</summary>
    public int MaxEntries { get; init; } = 16;
    /// <summary>Largest tar extended header (PAX or GNU long name) and zip directory.</summary>
    public int MaxHeaderBytes { get; init; } = 64 << 10;
}

/// <summary>An archive refused while unpacking: corrupt, or beyond a limit (<see cref="TooLarge"/>).</summary>
public sealed class ArchiveException(string message, bool tooLarge = false) : Exception(message)
{
    public bool TooLarge { get; } = tooLarge;
}

/// <summary>Unpacks an adapter uploaded as one .zip or .tar.gz, checking everything the archive
/// claims against what it holds, with every limit enforced while reading, headers included.
///
/// Written here rather than on System.IO.Compression.ZipArchive and System.Formats.Tar.TarReader
/// because both trust the archive where an upload must not: ZipArchive cuts an entry off at the size
/// its directory states and checks no CRC (a corrupt or understated entry is silently truncated), and
/// TarReader allocates a PAX extended header's declared size before reading it (a 1.4 GB allocation
/// from a few kilobytes of .tar.gz). Only what adapters need is read: stored and deflated zip entries,
/// and ustar/PAX/GNU tar regular files and folders; everything else is refused.</summary>
public static class AdapterArchive
{
    public static bool IsArchive(string fileName) =>
        fileName.EndsWith(".zip", StringComparison.OrdinalIgnoreCase) || fileName.EndsWith(".tar.gz", StringComparison.OrdinalIgnoreCase)
        || fileName.EndsWith(".tgz", StringComparison.OrdinalIgnoreCase);

    /// <summary>Calls <paramref name="onFile"/> with each regular file's name (as stored) and its data;
    /// the data stream refuses, with an <see cref="ArchiveException"/>, to yield more or fewer bytes than
    /// the archive declared or bytes whose checksum differs. Folders are skipped. Anything malformed or
    /// beyond <paramref name="limits"/> is an <see cref="ArchiveException"/>.</summary>
    public static void Unpack(Stream archive, string fileName, ArchiveLimits limits, Action<string, Stream> onFile)
    {
        if (fileName.EndsWith(".zip", StringComparison.OrdinalIgnoreCase)) Zip.Unpack(archive, limits, onFile);
        else Tar.Unpack(archive, limits, onFile);
    }

    /// <summary>Counts the file data unpacked so far against <see cref="ArchiveLimits.MaxBytes"/>.</summary>
    private sealed class Budget(long max)
    {
        private long _used;
        public void Take(long n, string entry)
        {
            _used += n;
            if (_used > max) throw new ArchiveException($"the archive unpacks to more than {max} bytes (at '{entry}')", tooLarge: true);
        }
    }

    /// <summary>One entry's data: exactly <c>length</c> bytes, checked (when a CRC is given) once the
    /// last byte is read. Decompressor errors become <see cref="ArchiveException"/>s.</summary>
    private sealed class EntryStream(Stream inner, string name, long length, uint? crc, Budget budget) : ReadOnlyStream
    {
        private readonly Crc32? _crc = crc is null ? null : new Crc32();
        private long _read;
        private bool _verified;

        public override int Read(Span<byte> buffer)
        {
            if (buffer.IsEmpty) return 0;
            if (_read == length) { Verify(); return 0; }
            // Ask for one byte past the declared end, so an entry longer than declared is caught.
            int want = (int)Math.Min(buffer.Length, length - _read + 1);
            int n;
            try { n = inner.Read(buffer[..want]); }
            catch (InvalidDataException) { throw new ArchiveException($"archive entry '{name}' is corrupt (its compressed data does not decompress)"); }
            if (n == 0)
                throw new ArchiveException($"archive entry '{name}' holds {_read} bytes, but the archive declares {length}");
            if (_read + n > length)
                throw new ArchiveException($"archive entry '{name}' holds more than the {length} bytes the archive declares");
            budget.Take(n, name);
            _crc?.Append(buffer[..n]);
            _read += n;
            if (_read == length) Verify();
            return n;
        }

        private void Verify()
        {
            if (_verified) return;
            _verified = true;
            if (_crc is not null && _crc.GetCurrentHashAsUInt32() != crc)
                throw new ArchiveException($"archive entry '{name}' fails its CRC-32 check (the archive is corrupt)");
            // The compressed data must end where the entry does (a stored entry has no end marker).
            Span<byte> probe = stackalloc byte[1];
            int extra;
            try { extra = inner.Read(probe); }
            catch (InvalidDataException) { throw new ArchiveException($"archive entry '{name}' is corrupt (its compressed data does not decompress)"); }
            if (extra != 0) throw new ArchiveException($"archive entry '{name}' holds more than the {length} bytes the archive declares");
        }

        protected override void Dispose(bool disposing)
        {
            if (disposing) inner.Dispose();
            base.Dispose(disposing);
        }

        /// <summary>Reads whatever the caller left, so that every entry is checked in full.</summary>
        public void Drain()
        {
            var buffer = new byte[81920];
            while (Read(buffer) > 0) { }
        }
    }

    /// <summary>The parts of Stream a read-only, forward-only stream does not use.</summary>
    private abstract class ReadOnlyStream : Stream
    {
        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
        public abstract override int Read(Span<byte> buffer);
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    /// <summary>The bytes [start, start + length) of a seekable stream.</summary>
    private sealed class Window(Stream inner, long start, long length) : ReadOnlyStream
    {
        private long _position;
        public override int Read(Span<byte> buffer)
        {
            int want = (int)Math.Min(buffer.Length, length - _position);
            if (want <= 0) return 0;
            inner.Position = start + _position;
            int n = inner.Read(buffer[..want]);
            _position += n;
            return n;
        }
    }

    /// <summary>The next <c>length</c> bytes of a forward-only stream (one tar entry's data).</summary>
    private sealed class Slice(Stream inner, long length) : ReadOnlyStream
    {
        private long _left = length;
        public override int Read(Span<byte> buffer)
        {
            int want = (int)Math.Min(buffer.Length, _left);
            if (want <= 0) return 0;
            int n = inner.Read(buffer[..want]);
            _left -= n;
            return n;
        }
    }

    /// <summary>The decompressed tar: refuses to yield more than <c>cap</c> bytes in all, headers
    /// included; gzip errors become <see cref="ArchiveException"/>s.</summary>
    private sealed class Capped(Stream inner, long cap) : ReadOnlyStream
    {
        private long _read;
        public override int Read(Span<byte> buffer)
        {
            int n;
            try { n = inner.Read(buffer); }
            catch (InvalidDataException) { throw new ArchiveException("the archive is not valid gzip data"); }
            _read += n;
            if (_read > cap) throw new ArchiveException($"the archive unpacks to more than {cap} bytes", tooLarge: true);
            return n;
        }
    }

    private static string DecodeName(ReadOnlySpan<byte> bytes, string where)
    {
        try { return new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes); }
        catch (DecoderFallbackException) { throw new ArchiveException($"{where}: an entry name is not valid UTF-8"); }
    }

    /// <summary>Zip as written by zip tools, Python's zipfile and .NET: the central directory is the
    /// list of entries; each entry's local header locates its data. Zip64, encryption, multi-disk
    /// archives and methods other than stored and deflate are refused.</summary>
    private static class Zip
    {
        private const uint EndSignature = 0x06054b50, CentralSignature = 0x02014b50, LocalSignature = 0x04034b50;
        private const int EndSize = 22, CentralSize = 46, LocalSize = 30;

        private sealed record Entry(string Name, ushort Method, uint Crc, long CompressedSize, long Size, long LocalOffset);

        public static void Unpack(Stream archive, ArchiveLimits limits, Action<string, Stream> onFile)
        {
            if (!archive.CanSeek) throw new ArchiveException("a .zip upload must be seekable");
            long length = archive.Length;
            var (entries, directoryStart) = ReadDirectory(archive, length, limits);
            long declared = 0;
            foreach (var e in entries) declared += e.Size;
            if (declared > limits.MaxBytes) throw new ArchiveException($"the archive declares {declared} bytes of files, more than {limits.MaxBytes}", tooLarge: true);
            var budget = new Budget(limits.MaxBytes);
            foreach (var e in entries)
            {
                if (e.Name.EndsWith('/'))
                {
                    if (e.Size != 0) throw new ArchiveException($"zip folder entry '{e.Name}' holds data");
                    continue;
                }
                var local = ReadExactly(archive, e.LocalOffset, LocalSize, e.Name);
                if (BinaryPrimitives.ReadUInt32LittleEndian(local) != LocalSignature)
                    throw new ArchiveException($"zip entry '{e.Name}': no local header where the directory says");
                long dataStart = e.LocalOffset + LocalSize + BinaryPrimitives.ReadUInt16LittleEndian(local.AsSpan(26)) + BinaryPrimitives.ReadUInt16LittleEndian(local.AsSpan(28));
                if (dataStart + e.CompressedSize > directoryStart)
                    throw new ArchiveException($"zip entry '{e.Name}': its data runs past the start of the central directory");
                Stream raw = new Window(archive, dataStart, e.CompressedSize);
                if (e.Method == 0 && e.CompressedSize != e.Size)
                    throw new ArchiveException($"zip entry '{e.Name}' is stored uncompressed, but its sizes differ ({e.CompressedSize} and {e.Size})");
                using var data = new EntryStream(e.Method == 8 ? new DeflateStream(raw, CompressionMode.Decompress) : raw, e.Name, e.Size, e.Crc, budget);
                onFile(e.Name, data);
                data.Drain();
            }
        }

        private static (List<Entry> Entries, long DirectoryStart) ReadDirectory(Stream archive, long length, ArchiveLimits limits)
        {
            if (length < EndSize) throw new ArchiveException("not a zip archive (too short)");
            // The end record is the last 22 bytes plus a comment of at most 65535 bytes.
            int tail = (int)Math.Min(length, EndSize + 0xFFFF);
            var buffer = ReadExactly(archive, length - tail, tail, "the end of the archive");
            int at = -1;
            for (int i = tail - EndSize; i >= 0; i--)
                if (BinaryPrimitives.ReadUInt32LittleEndian(buffer.AsSpan(i)) == EndSignature) { at = i; break; }
            if (at < 0) throw new ArchiveException("not a zip archive (no end of central directory record)");
            var end = buffer.AsSpan(at);
            ushort disk = BinaryPrimitives.ReadUInt16LittleEndian(end[4..]), directoryDisk = BinaryPrimitives.ReadUInt16LittleEndian(end[6..]);
            ushort onDisk = BinaryPrimitives.ReadUInt16LittleEndian(end[8..]), total = BinaryPrimitives.ReadUInt16LittleEndian(end[10..]);
            uint size = BinaryPrimitives.ReadUInt32LittleEndian(end[12..]), offset = BinaryPrimitives.ReadUInt32LittleEndian(end[16..]);
            if (total == 0xFFFF || size == 0xFFFFFFFF || offset == 0xFFFFFFFF)
                throw new ArchiveException("zip64 archives are not accepted (an adapter is far smaller than 4 GiB)");
            if (disk != 0 || directoryDisk != 0 || onDisk != total) throw new ArchiveException("multi-disk zip archives are not accepted");
            if (total > limits.MaxEntries) throw new ArchiveException($"the archive has {total} entries (at most {limits.MaxEntries})");
            long directoryStart = offset, endStart = length - tail + at;
            if (directoryStart + size > endStart) throw new ArchiveException("the zip central directory runs past the end record");
            if (size > limits.MaxHeaderBytes) throw new ArchiveException($"the zip central directory is {size} bytes (at most {limits.MaxHeaderBytes})");
            var directory = ReadExactly(archive, directoryStart, (int)size, "the central directory");
            var entries = new List<Entry>();
            var names = new HashSet<string>(StringComparer.Ordinal);
            int p = 0;
            for (int i = 0; i < total; i++)
            {
                if (p + CentralSize > directory.Length || BinaryPrimitives.ReadUInt32LittleEndian(directory.AsSpan(p)) != CentralSignature)
                    throw new ArchiveException("the zip central directory is corrupt");
                var d = directory.AsSpan(p);
                ushort flags = BinaryPrimitives.ReadUInt16LittleEndian(d[8..]), method = BinaryPrimitives.ReadUInt16LittleEndian(d[10..]);
                uint crc = BinaryPrimitives.ReadUInt32LittleEndian(d[16..]);
                uint compressed = BinaryPrimitives.ReadUInt32LittleEndian(d[20..]), uncompressed = BinaryPrimitives.ReadUInt32LittleEndian(d[24..]);
                int nameLength = BinaryPrimitives.ReadUInt16LittleEndian(d[28..]), extraLength = BinaryPrimitives.ReadUInt16LittleEndian(d[30..]);
                int commentLength = BinaryPrimitives.ReadUInt16LittleEndian(d[32..]);
                uint localOffset = BinaryPrimitives.ReadUInt32LittleEndian(d[42..]);
                int next = p + CentralSize + nameLength + extraLength + commentLength;
                if (next > directory.Length) throw new ArchiveException("the zip central directory is corrupt");
                var name = DecodeName(directory.AsSpan(p + CentralSize, nameLength), "zip");
                if ((flags & 1) != 0) throw new ArchiveException($"zip entry '{name}' is encrypted");
                if (method is not (0 or 8)) throw new ArchiveException($"zip entry '{name}' uses compression method {method} (only stored and deflate are read)");
                if (compressed == 0xFFFFFFFF || uncompressed == 0xFFFFFFFF || localOffset == 0xFFFFFFFF)
                    throw new ArchiveException("zip64 archives are not accepted (an adapter is far smaller than 4 GiB)");
                if (localOffset >= directoryStart) throw new ArchiveException($"zip entry '{name}': its local header lies outside the archive's data");
                if (!names.Add(name)) throw new ArchiveException($"zip entry '{name}' appears twice");
                entries.Add(new Entry(name, method, crc, compressed, uncompressed, localOffset));
                p = next;
            }
            return (entries, directoryStart);
        }

        private static byte[] ReadExactly(Stream s, long offset, int count, string what)
        {
            if (offset < 0 || offset + count > s.Length) throw new ArchiveException($"zip: {what} lies outside the archive");
            var buffer = new byte[count];
            s.Position = offset;
            s.ReadExactly(buffer);
            return buffer;
        }
    }

    /// <summary>A gzip-compressed tar (ustar, with PAX and GNU extensions for long names). The
    /// decompressed stream is capped at the byte limit plus room for headers, so neither data nor
    /// headers can grow memory or disk beyond it.</summary>
    private static class Tar
    {
        private const int Block = 512;

        public static void Unpack(Stream archive, ArchiveLimits limits, Action<string, Stream> onFile)
        {
            using var gzip = new GZipStream(archive, CompressionMode.Decompress, leaveOpen: true);
            // Headers, padding and the end marker come on top of the file data.
            long cap = limits.MaxBytes + 4L * (limits.MaxEntries + 2) * (Block + (long)limits.MaxHeaderBytes) + 2 * Block;
            var input = new Capped(gzip, cap);
            var budget = new Budget(limits.MaxBytes);
            var header = new byte[Block];
            int files = 0, headers = 0;
            string? longName = null;
            long? paxSize = null;
            while (true)
            {
                if (!ReadBlock(input, header))
                {
                    // An archive ends with zero blocks; tar tools accept a missing marker, and so do we.
                    return;
                }
                if (header.All(b => b == 0)) return;
                if (++headers > 4 * limits.MaxEntries) throw new ArchiveException($"the archive has more than {limits.MaxEntries} entries");
                VerifyChecksum(header);
                char type = (char)header[156];
                long size = Octal(header.AsSpan(124, 12), "size", limits);
                switch (type)
                {
                    case 'x' or 'g' or 'L' or 'K':
                        if (size > limits.MaxHeaderBytes)
                            throw new ArchiveException($"a tar extended header declares {size} bytes (at most {limits.MaxHeaderBytes})");
                        var data = new byte[size];
                        ReadExactly(input, data);
                        Skip(input, Padding(size));
                        if (type == 'x') (longName, paxSize) = Pax(data, longName, limits);
                        else if (type == 'L') longName = DecodeName(data.AsSpan(0, Math.Max(0, Array.IndexOf(data, (byte)0) is var z and >= 0 ? z : data.Length)), "tar");
                        continue;   // 'g' (global) and 'K' (long link name) are read and ignored
                }
                if (paxSize is { } overridden) size = overridden;
                var name = longName ?? Name(header);
                longName = null;
                paxSize = null;
                if (++files > limits.MaxEntries) throw new ArchiveException($"the archive has more than {limits.MaxEntries} entries");
                switch (type)
                {
                    case '5':
                        Skip(input, size + Padding(size));
                        continue;
                    case '0' or '\0' or '7':
                        if (size > limits.MaxBytes) throw new ArchiveException($"tar entry '{name}' declares {size} bytes, more than {limits.MaxBytes}", tooLarge: true);
                        using (var entry = new EntryStream(new Slice(input, size), name, size, crc: null, budget))
                        {
                            onFile(name, entry);
                            entry.Drain();
                        }
                        Skip(input, Padding(size));
                        continue;
                    default:
                        throw new ArchiveException($"archive entry '{name}' is not a regular file (links and devices are refused)");
                }
            }
        }

        private static long Padding(long size) => (Block - size % Block) % Block;

        private static string Name(byte[] h)
        {
            string Field(int at, int length)
            {
                var span = h.AsSpan(at, length);
                int end = span.IndexOf((byte)0);
                return DecodeName(end < 0 ? span : span[..end], "tar");
            }
            var name = Field(0, 100);
            bool ustar = h.AsSpan(257, 5).SequenceEqual("ustar"u8);
            var prefix = ustar ? Field(345, 155) : "";
            return prefix.Length > 0 ? prefix + "/" + name : name;
        }

        private static void VerifyChecksum(byte[] h)
        {
            long stored = 0;
            bool any = false;
            foreach (var b in h.AsSpan(148, 8))
            {
                if (b is (byte)' ' or 0) { if (any) break; continue; }
                if (b is < (byte)'0' or > (byte)'7') throw new ArchiveException("a tar header's checksum is not an octal number (the archive is corrupt)");
                stored = stored * 8 + (b - '0');
                any = true;
            }
            long sum = 0;
            for (int i = 0; i < Block; i++) sum += i is >= 148 and < 156 ? ' ' : h[i];
            if (!any || stored != sum) throw new ArchiveException("a tar header fails its checksum (the archive is corrupt)");
        }

        /// <summary>A header number: octal digits, NUL or space terminated (base-256 sizes are refused:
        /// they only serve files of 8 GiB and more).</summary>
        private static long Octal(ReadOnlySpan<byte> field, string what, ArchiveLimits limits)
        {
            if ((field[0] & 0x80) != 0) throw new ArchiveException($"a tar header's {what} is in base-256 form (files of 8 GiB or more are refused)", tooLarge: true);
            long value = 0;
            bool started = false;
            foreach (var b in field)
            {
                if (b is (byte)' ' or 0) { if (started) break; continue; }
                if (b is < (byte)'0' or > (byte)'7') throw new ArchiveException($"a tar header's {what} is not an octal number (the archive is corrupt)");
                value = value * 8 + (b - '0');
                started = true;
            }
            return value;
        }

        /// <summary>PAX records "LENGTH key=value\n": the path and size override the next header's.</summary>
        private static (string? Path, long? Size) Pax(byte[] data, string? path, ArchiveLimits limits)
        {
            long? size = null;
            int p = 0;
            while (p < data.Length)
            {
                int space = Array.IndexOf(data, (byte)' ', p);
                if (space < 0 || space == p || space - p > 9) throw new ArchiveException("a PAX extended header is malformed");
                int length = 0;
                for (int i = p; i < space; i++)
                {
                    if (data[i] is < (byte)'0' or > (byte)'9') throw new ArchiveException("a PAX extended header is malformed");
                    length = length * 10 + (data[i] - '0');
                }
                if (length <= space - p + 1 || p + length > data.Length || data[p + length - 1] != (byte)'\n')
                    throw new ArchiveException("a PAX extended header is malformed");
                var record = data.AsSpan(space + 1, p + length - 1 - (space + 1));
                int eq = record.IndexOf((byte)'=');
                if (eq <= 0) throw new ArchiveException("a PAX extended header is malformed");
                var key = Encoding.ASCII.GetString(record[..eq]);
                var value = record[(eq + 1)..];
                if (key == "path") path = DecodeName(value, "tar");
                else if (key == "size")
                {
                    if (value.Length is 0 or > 18 || value.IndexOfAnyExceptInRange((byte)'0', (byte)'9') >= 0)
                        throw new ArchiveException("a PAX extended header's size is not a number");
                    size = long.Parse(Encoding.ASCII.GetString(value), System.Globalization.CultureInfo.InvariantCulture);
                    if (size > limits.MaxBytes) throw new ArchiveException($"a PAX extended header declares a file of {size} bytes, more than {limits.MaxBytes}", tooLarge: true);
                }
                p += length;
            }
            return (path, size);
        }

        private static bool ReadBlock(Stream s, byte[] block)
        {
            int total = 0;
            while (total < block.Length)
            {
                int n = s.Read(block, total, block.Length - total);
                if (n == 0)
                {
                    if (total == 0) return false;
                    throw new ArchiveException("the archive ends inside a tar header (it is truncated)");
                }
                total += n;
            }
            return true;
        }

        private static void ReadExactly(Stream s, byte[] buffer)
        {
            int total = 0;
            while (total < buffer.Length)
            {
                int n = s.Read(buffer, total, buffer.Length - total);
                if (n == 0) throw new ArchiveException("the archive ends inside an entry (it is truncated)");
                total += n;
            }
        }

        private static void Skip(Stream s, long count)
        {
            var buffer = new byte[Math.Min(count, 81920)];
            while (count > 0)
            {
                int n = s.Read(buffer, 0, (int)Math.Min(buffer.Length, count));
                if (n == 0) throw new ArchiveException("the archive ends inside an entry (it is truncated)");
                count -= n;
            }
        }
    }
}
