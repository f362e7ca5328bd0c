using System.Text;
using PeftServe.Core.SafeTensors;

namespace PeftServe.Core.Tests.SafeTensors;

/// <summary>One hand-made corrupt file per validation rule. Each asserts the specific complaint (so a
/// file rejected for some other reason fails the test), the file's path, and the tensor's name.</summary>
public sealed class SafeTensorsValidationTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static SafeTensorsFormatException Rejects(string path, string? tensor, string complaint)
    {
        var e = Assert.Throws<SafeTensorsFormatException>(() => SafeTensorsFile.Open(path).Dispose());
        Assert.Contains(path, e.Message);
        Assert.Equal(path, e.FilePath);
        Assert.Equal(tensor, e.TensorName);
        if (tensor is not null) Assert.Contains($"'{tensor}'", e.Message);
        Assert.Contains(complaint, e.Message);
        return e;
    }

    private static string Entry(string name, string dtype, string shape, string offsets) =>
        $"\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":{offsets}}}";

    [Fact]
    public void WellFormedCraftedFileIsAccepted()
    {
        // The baseline the corrupt files below deviate from: proves Craft itself makes valid files.
        var path = _dir.Craft("ok.safetensors", "{" + Entry("w", "F32", "[2,3]", "[0,24]") + "}", 24);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(24, file.Info("w").ByteLength);
        Assert.Equal(5, file.GetBytes("w")[5]);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(7)]
    public void FileShorterThanEightBytes(int length)
    {
        var path = _dir.File($"short{length}.safetensors");
        File.WriteAllBytes(path, new byte[length]);
        Rejects(path, null, "shorter than the 8-byte");
    }

    [Fact]
    public void HeaderLengthBeyondTheFile()
    {
        var header = "{" + Entry("w", "U8", "[4]", "[0,4]") + "}";
        var path = _dir.Craft("beyond.safetensors", header, 4, lengthPrefix: (ulong)header.Length + 5);
        Rejects(path, null, "only");
    }

    [Theory]
    [InlineData(100_000_001UL)]
    [InlineData(ulong.MaxValue)]
    public void HeaderLengthAbsurdlyLarge(ulong prefix)
    {
        var path = _dir.Craft("huge.safetensors", "{}", 0, lengthPrefix: prefix);
        Rejects(path, null, "limit");
    }

    [Fact]
    public void HeaderNotUtf8()
    {
        // A lone continuation byte inside the tensor name: invalid UTF-8.
        var header = Encoding.UTF8.GetBytes("{\"w").Concat(new byte[] { 0x80 }).Concat(Encoding.UTF8.GetBytes("\":{}}")).ToArray();
        var path = _dir.Craft("utf8.safetensors", header, 0);
        Rejects(path, null, "not valid UTF-8");
    }

    [Theory]
    [InlineData("{\"w\": {\"dtype\": \"F32\",")]
    [InlineData("")]
    [InlineData("{} trailing")]
    public void HeaderNotJson(string header)
    {
        var path = _dir.Craft("json.safetensors", header, 0);
        Rejects(path, null, "not valid JSON");
    }

    [Theory]
    [InlineData("[1, 2]", "array")]
    [InlineData("\"text\"", "string")]
    [InlineData("null", "null")]
    public void HeaderNotAnObject(string header, string kind)
    {
        var path = _dir.Craft("notobj.safetensors", header, 0);
        Rejects(path, null, $"JSON {kind}, not an object");
    }

    [Fact]
    public void EntryNotAnObject()
    {
        var path = _dir.Craft("entry.safetensors", "{\"w\": [1, 2]}", 0);
        Rejects(path, "w", "header entry is a JSON array");
    }

    [Theory]
    [InlineData("{\"shape\":[1],\"data_offsets\":[0,4]}", "no \"dtype\"")]
    [InlineData("{\"dtype\":\"F32\",\"data_offsets\":[0,4]}", "no \"shape\"")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":[1]}", "no \"data_offsets\"")]
    public void EntryMissingAField(string entry, string complaint)
    {
        var path = _dir.Craft("missing.safetensors", "{\"layer.w\":" + entry + "}", 4);
        Rejects(path, "layer.w", complaint);
    }

    [Theory]
    [InlineData("{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}", "\"dtype\" is a JSON number")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}", "\"shape\" is a JSON string")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}", "element 0 (1.5) is not an integer")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}", "is not an integer")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,4]}", "is not an integer")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{\"begin\":0}}", "must be an array [begin, end]")]
    [InlineData("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,\"4\"]}", "end (\"4\") is not a non-negative integer")]
    public void EntryFieldOfTheWrongType(string entry, string complaint)
    {
        var path = _dir.Craft("types.safetensors", "{\"w\":" + entry + "}", 4);
        Rejects(path, "w", complaint);
    }

    [Fact]
    public void NegativeDimension()
    {
        var path = _dir.Craft("neg.safetensors", "{" + Entry("w", "F32", "[2,-1]", "[0,0]") + "}", 0);
        Rejects(path, "w", "\"shape\" element 1 is negative (-1)");
    }

    [Theory]
    [InlineData("F8_E4M3")]
    [InlineData("C64")]
    [InlineData("U16")]
    [InlineData("f32")]
    public void UnknownDType(string dtype)
    {
        var path = _dir.Craft("dtype.safetensors", "{" + Entry("w", dtype, "[1]", "[0,1]") + "}", 8);
        Rejects(path, "w", $"dtype \"{dtype}\" is not supported");
    }

    [Theory]
    [InlineData("[0]")]
    [InlineData("[0,4,8]")]
    [InlineData("[]")]
    public void DataOffsetsNotAPair(string offsets)
    {
        var path = _dir.Craft("pair.safetensors", "{" + Entry("w", "F32", "[1]", offsets) + "}", 8);
        Rejects(path, "w", "must be an array [begin, end]");
    }

    [Fact]
    public void DataOffsetsBeginAfterEnd()
    {
        var path = _dir.Craft("order.safetensors", "{" + Entry("w", "F32", "[1]", "[8,4]") + "}", 8);
        Rejects(path, "w", "begin after end");
    }

    [Fact]
    public void DataOffsetNegative()
    {
        var path = _dir.Craft("negoff.safetensors", "{" + Entry("w", "F32", "[1]", "[-4,0]") + "}", 8);
        Rejects(path, "w", "begin (-4) is not a non-negative integer");
    }

    [Theory]
    [InlineData("F32", "[2,3]", "[0,20]", "span 20 bytes but F32[2, 3] needs 24")]
    [InlineData("BF16", "[4]", "[0,4]", "span 4 bytes but BF16[4] needs 8")]
    [InlineData("I64", "[]", "[0,4]", "span 4 bytes but I64[] needs 8")]
    public void ByteLengthDisagreesWithShapeAndDType(string dtype, string shape, string offsets, string complaint)
    {
        var path = _dir.Craft("size.safetensors", "{" + Entry("w", dtype, shape, offsets) + "}", 32);
        Rejects(path, "w", complaint);
    }

    [Theory]
    [InlineData("[4294967296,4294967296]", "F32")]     // 2^64 elements
    [InlineData("[2305843009213693952]", "F32")]       // 2^61 elements fit a long, their 2^63 bytes do not
    public void SizeArithmeticOverflow(string shape, string dtype)
    {
        var path = _dir.Craft("overflow.safetensors", "{" + Entry("w", dtype, shape, "[0,0]") + "}", 0);
        Rejects(path, "w", "overflows a 64-bit byte count");
    }

    [Fact]
    public void RangeOutsideTheDataSection()
    {
        var header = "{" + Entry("a", "F32", "[2]", "[0,8]") + "," + Entry("b", "F32", "[2]", "[8,16]") + "}";
        var path = _dir.Craft("outside.safetensors", header, 12);
        Rejects(path, "b", "run past the end of the data section (12 bytes)");
    }

    [Fact]
    public void OverlappingRanges()
    {
        // Listed out of order on purpose: the check must sort by begin.
        var header = "{" + Entry("c", "U8", "[4]", "[8,12]") + "," + Entry("a", "U8", "[6]", "[0,6]") + ","
                     + Entry("b", "U8", "[4]", "[4,8]") + "}";
        var path = _dir.Craft("overlap.safetensors", header, 12);
        var e = Rejects(path, "b", "overlap");
        Assert.Contains("'a'", e.Message);
    }

    [Fact]
    public void EmptyTensorsAnywhereAreAccepted()
    {
        var header = "{" + Entry("a", "U8", "[2]", "[0,2]") + "," + Entry("e", "F32", "[0,5]", "[2,2]") + ","
                     + Entry("b", "U8", "[2]", "[2,4]") + "," + Entry("z", "F32", "[0]", "[4,4]") + "}";
        var path = _dir.Craft("empties.safetensors", header, 4);
        using var file = SafeTensorsFile.Open(path);
        Assert.Equal(new byte[] { 0, 1 }, file.GetBytes("a").ToArray());
        Assert.Equal(new byte[] { 2, 3 }, file.GetBytes("b").ToArray());
        Assert.Equal(0, file.GetBytes("e").Length);
    }

    [Fact]
    public void GapsBetweenTensorsAreRefused()
    {
        // As the format's own reader: bytes between tensors belong to no tensor and are refused.
        var header = "{" + Entry("a", "U8", "[2]", "[0,2]") + "," + Entry("b", "U8", "[2]", "[8,10]") + "}";
        Rejects(_dir.Craft("gap.safetensors", header, 10), "b", "gap of 6 bytes");
        var leading = "{" + Entry("a", "U8", "[2]", "[2,4]") + "}";
        Rejects(_dir.Craft("leading.safetensors", leading, 4), "a", "gap of 2 bytes");
    }

    [Fact]
    public void TrailingBytesAfterTheLastTensorAreRefused()
    {
        var header = "{" + Entry("a", "U8", "[2]", "[0,2]") + "}";
        Rejects(_dir.Craft("trailing.safetensors", header, 3), null, "trailing bytes");
        Rejects(_dir.Craft("no-tensors.safetensors", "{}", 1), null, "trailing bytes");
    }

    [Fact]
    public void DuplicateTensorName()
    {
        var header = "{" + Entry("w", "U8", "[2]", "[0,2]") + "," + Entry("w", "U8", "[2]", "[2,4]") + "}";
        var path = _dir.Craft("dup.safetensors", header, 4);
        Rejects(path, "w", "lists this tensor twice");
    }

    [Theory]
    [InlineData("[\"pt\"]", "\"__metadata__\" is a JSON array")]
    [InlineData("{\"format\":\"pt\",\"step\":3}", "entry 'step' is a JSON number")]
    [InlineData("{\"nested\":{\"a\":\"b\"}}", "entry 'nested' is a JSON object")]
    public void MetadataNotStringToString(string metadata, string complaint)
    {
        var header = "{\"__metadata__\":" + metadata + "," + Entry("w", "U8", "[2]", "[0,2]") + "}";
        var path = _dir.Craft("meta.safetensors", header, 2);
        Rejects(path, null, complaint);
    }
}
