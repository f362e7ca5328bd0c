using System.Buffers.Binary;
using PeftServe.Core.SafeTensors;
using TorchSharp;

namespace PeftServe.Core.Tests.SafeTensors;

public class SafeTensorsRoundTripTests
{
    public static TheoryData<torch.ScalarType, SafeTensorDType> AllDTypes => new()
    {
        { torch.ScalarType.Float32, SafeTensorDType.F32 },
        { torch.ScalarType.Float16, SafeTensorDType.F16 },
        { torch.ScalarType.BFloat16, SafeTensorDType.BF16 },
        { torch.ScalarType.Int64, SafeTensorDType.I64 },
        { torch.ScalarType.Int32, SafeTensorDType.I32 },
        { torch.ScalarType.Byte, SafeTensorDType.U8 },
        { torch.ScalarType.Int8, SafeTensorDType.I8 },
        { torch.ScalarType.Bool, SafeTensorDType.BOOL },
        { torch.ScalarType.Float64, SafeTensorDType.F64 },
        { torch.ScalarType.Int16, SafeTensorDType.I16 },
    };

    /// <summary>A tensor filled with arbitrary bit patterns (NaN payloads, subnormals, -0 included for
    /// float types); bool gets 0/1.</summary>
    private static torch.Tensor RandomBits(torch.ScalarType dtype, long[] shape, int seed)
    {
        var t = torch.empty(shape, dtype: dtype);
        var bytes = new byte[t.numel() * t.element_size()];
        var rng = new Random(seed);
        rng.NextBytes(bytes);
        if (dtype == torch.ScalarType.Bool)
            for (var i = 0; i < bytes.Length; i++) bytes[i] &= 1;
        bytes.CopyTo(t.bytes);
        return t;
    }

    [Theory]
    [MemberData(nameof(AllDTypes))]
    public void EveryDTypeRoundTripsBitForBit(torch.ScalarType scalar, SafeTensorDType expected)
    {
        using var dir = new TempDir();
        using var a = RandomBits(scalar, [3, 5, 7], 1);
        using var b = RandomBits(scalar, [11], 2);
        var path = dir.File("all.safetensors");
        SafeTensorsWriter.Write(path, [new("a", a), new("b.weight", b)]);

        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(["a", "b.weight"], file.Tensors.Select(t => t.Name));
        var info = file.Info("a");
        Assert.Equal(expected, info.DType);
        Assert.Equal(new long[] { 3, 5, 7 }, info.Shape);
        Assert.True(file.GetBytes("a").SequenceEqual(a.bytes));
        Assert.True(file.GetBytes("b.weight").SequenceEqual(b.bytes));

        using var readA = file.ToTensor("a");
        using var readB = file.ToTensor("b.weight");
        Assert.Equal(scalar, readA.dtype);
        Assert.Equal(a.shape, readA.shape);
        Assert.Equal(b.shape, readB.shape);
        Assert.True(readA.bytes.SequenceEqual(a.bytes));
        Assert.True(readB.bytes.SequenceEqual(b.bytes));
    }

    [Theory]
    [InlineData(10, 7)]
    [InlineData(1, 3)]
    [InlineData(64, 1000)]
    public void SlicedCopiesForLargeTensorsAreExact(int writeChunk, int readChunk)
    {
        // Tensors past 1 GiB are copied in slices; small slice sizes exercise that path here, with
        // slice sizes that are not multiples of the element size and a non-contiguous source.
        using var dir = new TempDir();
        using var f64 = RandomBits(torch.ScalarType.Float64, [5, 9], 4);
        using var bf16 = RandomBits(torch.ScalarType.BFloat16, [7, 3], 5);
        using var transposed = bf16.t();
        using var u8 = RandomBits(torch.ScalarType.Byte, [33], 6);
        var path = dir.File("sliced.safetensors");
        SafeTensorsWriter.Write(path, [new("f64", f64), new("bf16t", transposed), new("u8", u8)], null, writeChunk);

        using var file = SafeTensorsFile.Open(path);
        using var expectedT = transposed.contiguous();
        Assert.True(file.GetBytes("f64").SequenceEqual(f64.bytes));
        Assert.True(file.GetBytes("bf16t").SequenceEqual(expectedT.bytes));
        Assert.True(file.GetBytes("u8").SequenceEqual(u8.bytes));
        foreach (var (name, expected) in new[] { ("f64", f64), ("bf16t", expectedT), ("u8", u8) })
        {
            using var read = file.ToTensor(name, null, null, readChunk);
            Assert.Equal(expected.shape, read.shape);
            Assert.True(read.bytes.SequenceEqual(expected.bytes), name);
        }
    }

    [Fact]
    public void HalfAndBFloat16AreStoredInTheirStandardEncodings()
    {
        using var dir = new TempDir();
        using var values = torch.tensor(new float[] { 1.0f, -2.0f, 0.5f, 65504f });
        using var half = values.to(torch.ScalarType.Float16);
        using var bf16 = values.to(torch.ScalarType.BFloat16);
        var path = dir.File("halves.safetensors");
        SafeTensorsWriter.Write(path, [new("h", half), new("bf", bf16)]);

        using var file = SafeTensorsFile.Open(path);
        ushort[] Words(ReadOnlySpan<byte> b)
        {
            var w = new ushort[b.Length / 2];
            for (var i = 0; i < w.Length; i++) w[i] = BinaryPrimitives.ReadUInt16LittleEndian(b[(2 * i)..]);
            return w;
        }
        // IEEE half: 1.0 = 0x3C00, -2.0 = 0xC000, 0.5 = 0x3800, 65504 = 0x7BFF.
        Assert.Equal(new ushort[] { 0x3C00, 0xC000, 0x3800, 0x7BFF }, Words(file.GetBytes("h")));
        // bfloat16 is the top half of the float32: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00, 65504 -> 0x4780 (65536).
        Assert.Equal(new ushort[] { 0x3F80, 0xC000, 0x3F00, 0x4780 }, Words(file.GetBytes("bf")));

        using var back = file.ToTensor("bf", dtype: torch.ScalarType.Float32);
        Assert.Equal(new float[] { 1.0f, -2.0f, 0.5f, 65536f }, back.data<float>().ToArray());
        Assert.Equal(SafeTensorDType.BF16, file.Info("bf").DType);
    }

    [Fact]
    public void MetadataRoundTrips()
    {
        using var dir = new TempDir();
        using var t = torch.arange(6, dtype: torch.ScalarType.Int32);
        var metadata = new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["note"] = "quotes \" and unicode é 🙂, newline\n",
            ["empty"] = "",
        };
        var path = dir.File("meta.safetensors");
        SafeTensorsWriter.Write(path, [new("t", t)], metadata);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(metadata.OrderBy(kv => kv.Key), file.Metadata.OrderBy(kv => kv.Key));

        SafeTensorsWriter.Write(dir.File("none.safetensors"), [new("t", t)]);
        using var none = SafeTensorsFile.Open(dir.File("none.safetensors"));
        Assert.Empty(none.Metadata);
    }

    [Fact]
    public void NonAsciiNamesAreWrittenAsPlainUtf8AndReadBack()
    {
        using var dir = new TempDir();
        using var t = torch.ones(1, dtype: torch.ScalarType.Int8);
        const string name = "couche.é+<poids>/🙂";
        var path = dir.File("utf8.safetensors");
        SafeTensorsWriter.Write(path, [new(name, t)]);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(name, Assert.Single(file.Tensors).Name);
        var header = System.Text.Encoding.UTF8.GetString(File.ReadAllBytes(path), 8, (int)file.HeaderLength);
        // BMP characters are written as they are (System.Text.Json still escapes astral ones like the emoji, which is valid JSON).
        Assert.Contains("couche.é+<poids>/", header);
    }

    [Fact]
    public void NonContiguousScalarAndEmptyTensorsRoundTrip()
    {
        using var dir = new TempDir();
        using var matrix = torch.arange(12, dtype: torch.ScalarType.Float32).reshape(3, 4);
        using var transposed = matrix.t();
        Assert.False(transposed.is_contiguous());
        using var scalar = torch.tensor(42L);
        using var empty = torch.empty([0, 3], dtype: torch.ScalarType.Float16);
        var path = dir.File("shapes.safetensors");
        SafeTensorsWriter.Write(path, new Dictionary<string, torch.Tensor> { ["t"] = transposed, ["s"] = scalar, ["e"] = empty });

        using var file = SafeTensorsFile.Open(path);
        using var t = file.ToTensor("t");
        Assert.Equal(new long[] { 4, 3 }, t.shape);
        Assert.Equal(new float[] { 0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11 }, t.data<float>().ToArray());
        Assert.Empty(file.Info("s").Shape);
        using var s = file.ToTensor("s");
        Assert.Equal(42L, s.item<long>());
        var e = file.Info("e");
        Assert.Equal(0, e.ByteLength);
        Assert.Equal(e.Begin, e.End);
        using var et = file.ToTensor("e");
        Assert.Equal(new long[] { 0, 3 }, et.shape);
        Assert.Equal(0, file.GetBytes("e").Length);
    }

    [Fact]
    public void HeaderIsPaddedSoDataStartsEightByteAligned()
    {
        using var dir = new TempDir();
        for (var len = 1; len <= 8; len++)
        {
            using var t = torch.zeros(1, dtype: torch.ScalarType.Byte);
            var path = dir.File($"pad{len}.safetensors");
            SafeTensorsWriter.Write(path, [new(new string('x', len), t)]);
            using var file = SafeTensorsFile.Open(path);
            Assert.Equal(0, (8 + file.HeaderLength) % 8);
            Assert.Equal(8 + file.HeaderLength + 1, new FileInfo(path).Length);
        }
    }

    [Fact]
    public void WriteReplacesAnExistingFileAtomicallyAndLeavesNoTemporaryFiles()
    {
        using var dir = new TempDir();
        var path = dir.File("w.safetensors");
        using var first = torch.full([4], 1.0f);
        using var second = torch.full([2, 2], 7, dtype: torch.ScalarType.Int64);
        SafeTensorsWriter.Write(path, [new("x", first)]);
        using (var old = SafeTensorsFile.Open(path))
        {
            // Replace it while the old version is still mapped: the reader keeps seeing the old data.
            SafeTensorsWriter.Write(path, [new("y", second)]);
            Assert.True(old.Contains("x"));
            using var x = old.ToTensor("x");
            Assert.Equal(new float[] { 1, 1, 1, 1 }, x.data<float>().ToArray());
        }
        using var fresh = SafeTensorsFile.Open(path);
        Assert.False(fresh.Contains("x"));
        using var y = fresh.ToTensor("y");
        Assert.Equal(new long[] { 7, 7, 7, 7 }, y.data<long>().ToArray());
        Assert.Equal(["w.safetensors"], Directory.GetFiles(dir.Path).Select(Path.GetFileName));
    }

    [Fact]
    public void WriterRejectsBadInputsWithoutTouchingTheTarget()
    {
        using var dir = new TempDir();
        var path = dir.File("bad.safetensors");
        using var ok = torch.ones(2);
        SafeTensorsWriter.Write(path, [new("keep", ok)]);
        var before = File.ReadAllBytes(path);

        using var complex = torch.zeros(2, dtype: torch.ScalarType.ComplexFloat32);
        var e1 = Assert.Throws<ArgumentException>(() => SafeTensorsWriter.Write(path, [new("ok", ok), new("z", complex)]));
        Assert.Contains("'z'", e1.Message);
        Assert.Contains(path, e1.Message);
        var e2 = Assert.Throws<ArgumentException>(() => SafeTensorsWriter.Write(path, [new("d", ok), new("d", ok)]));
        Assert.Contains("'d'", e2.Message);
        Assert.Throws<ArgumentException>(() => SafeTensorsWriter.Write(path, [new("__metadata__", ok)]));
        var disposed = torch.ones(1);
        disposed.Dispose();
        Assert.Throws<ArgumentException>(() => SafeTensorsWriter.Write(path, [new("gone", disposed)]));

        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(dir.Path));
    }

    [Fact]
    public void DisposedFileRefusesAccess()
    {
        using var dir = new TempDir();
        using var t = torch.ones(3);
        var path = dir.File("d.safetensors");
        SafeTensorsWriter.Write(path, [new("t", t)]);
        var file = SafeTensorsFile.Open(path);
        Assert.Equal(12, file.GetBytes("t").Length);
        file.Dispose();
        Assert.Throws<ObjectDisposedException>(() => file.GetBytes("t").Length);
        Assert.Throws<ObjectDisposedException>(() => file.ToTensor("t"));
        file.Dispose(); // twice is fine
    }

    [Fact]
    public void UnknownTensorNameIsAClearError()
    {
        using var dir = new TempDir();
        using var t = torch.ones(3);
        var path = dir.File("k.safetensors");
        SafeTensorsWriter.Write(path, [new("t", t)]);
        using var file = SafeTensorsFile.Open(path);
        var e = Assert.Throws<KeyNotFoundException>(() => file.Info("nope"));
        Assert.Contains(path, e.Message);
        Assert.Contains("'nope'", e.Message);
        Assert.Throws<KeyNotFoundException>(() => file.GetBytes("nope").Length);
        Assert.Throws<KeyNotFoundException>(() => file.ToTensor("nope"));
    }

    [Fact]
    public void ConcurrentReadsAgree()
    {
        using var dir = new TempDir();
        using var t = RandomBits(torch.ScalarType.Float32, [64, 64], 3);
        var path = dir.File("c.safetensors");
        SafeTensorsWriter.Write(path, [new("t", t)]);
        using var file = SafeTensorsFile.Open(path);
        var expected = t.bytes.ToArray();
        Parallel.For(0, 16, _ =>
        {
            using var r = file.ToTensor("t");
            Assert.True(r.bytes.SequenceEqual(expected));
        });
    }
}
