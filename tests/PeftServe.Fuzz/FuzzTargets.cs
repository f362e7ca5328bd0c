using System.Text;
using System.Text.Json;
using PeftServe.Core.Adapters;
using PeftServe.Core.Generation;
using PeftServe.Core.Model;
using PeftServe.Core.Runtime;
using PeftServe.Core.SafeTensors;
using PeftServe.Core.Templates;
using PeftServe.Core.Tokenization;

namespace PeftServe.Fuzz;

/// <summary>The fuzzed parsers, one entry point each, taking the fuzzer's bytes. Each parser promises
/// one typed exception for bad input; the harness swallows exactly that one, so anything else that
/// escapes (an IndexOutOfRangeException, a NullReferenceException, a stack overflow ...) is a crash
/// for AFL++ and a failure for the regression test that replays the corpus. No harness returns before
/// calling its parser, even on no bytes: SharpFuzz may read the first input before AFL++ has written it,
/// and a first run that touches no instrumented code makes AFL++ abort ("No instrumentation detected").</summary>
public static class FuzzTargets
{
    public static readonly IReadOnlyDictionary<string, Action<byte[]>> All = new Dictionary<string, Action<byte[]>>
    {
        ["safetensors"] = SafeTensors,
        ["adapter-config"] = AdapterConfig,
        ["tokenizer"] = TokenizerJson,
        ["jinja"] = Jinja,
        ["archive"] = Archive,
        ["guided-json"] = GuidedJson,
    };

    /// <summary>A scratch folder of this process (in memory where /dev/shm exists).</summary>
    private static readonly string Scratch = CreateScratch();

    private static string CreateScratch()
    {
        var root = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        var dir = Path.Combine(root, $"peftserve-fuzz-{Environment.ProcessId}");
        Directory.CreateDirectory(dir);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => { try { Directory.Delete(dir, true); } catch (IOException) { } };
        return dir;
    }

    /// <summary>safetensors: the whole file (header length, JSON header, data). Promises SafeTensorsFormatException.</summary>
    public static void SafeTensors(byte[] input)
    {
        var path = Path.Combine(Scratch, "fuzz.safetensors");
        File.WriteAllBytes(path, input);
        try
        {
            using var file = SafeTensorsFile.Open(path);
            foreach (var t in file.Tensors)
            {
                file.AllFinite(t.Name);
                if (t.ByteLength <= 1 << 20) _ = file.GetBytes(t.Name).Length;
            }
        }
        catch (SafeTensorsFormatException) { }
    }

    private static readonly Lazy<ModelConfig> Model = new(() => ModelConfig.Load(DefaultModel.Directory));
    private static readonly Lazy<string[]> Weights = new(() =>
        Directory.GetDirectories(Path.Combine(AppContext.BaseDirectory, "fixtures", "adapters")).Order(StringComparer.Ordinal).ToArray());

    /// <summary>adapter_config.json: the first byte picks one of the example adapters' weights, the rest
    /// is the config. Checked both ways (metadata-only and full load). Promises AdapterException.</summary>
    public static void AdapterConfig(byte[] input)
    {
        var dir = Path.Combine(Scratch, "adapter");
        Directory.CreateDirectory(dir);
        var weights = Weights.Value[(input.Length == 0 ? 0 : input[0]) % Weights.Value.Length];
        File.Copy(Path.Combine(weights, AdapterFolder.WeightsFile), Path.Combine(dir, AdapterFolder.WeightsFile), overwrite: true);
        File.WriteAllBytes(Path.Combine(dir, AdapterFolder.ConfigFile), input.Length == 0 ? [] : input[1..]);
        try
        {
            AdapterMethods.Validate(dir, "fuzz", Model.Value, new AdapterLimits());
            AdapterMethods.Load(dir, "fuzz", Model.Value, new AdapterLimits()).Dispose();
        }
        catch (AdapterException) { }
    }

    /// <summary>tokenizer.json (beside the default model's tokenizer_config.json); a tokenizer that
    /// loads also encodes and decodes a mixed sentence. Promises InvalidDataException.</summary>
    public static void TokenizerJson(byte[] input)
    {
        var dir = Path.Combine(Scratch, "tokenizer");
        if (!Directory.Exists(dir))
        {
            Directory.CreateDirectory(dir);
            File.Copy(Path.Combine(DefaultModel.Directory, "tokenizer_config.json"), Path.Combine(dir, "tokenizer_config.json"));
        }
        File.WriteAllBytes(Path.Combine(dir, "tokenizer.json"), input);
        try
        {
            var tokenizer = Tokenizer.FromDirectory(dir);
            // A vocabulary without the text's characters and no unknown token is refused the same way.
            var ids = tokenizer.Encode("Hello, world! 123 ünïcödé <|im_start|> 🙂\n\tend");
            tokenizer.Decode(ids);
        }
        catch (InvalidDataException) { }
    }

    private static readonly Dictionary<string, object?> JinjaContext = new()
    {
        ["messages"] = new List<object?>
        {
            new Dictionary<string, object?> { ["role"] = "system", ["content"] = "Be brief." },
            new Dictionary<string, object?> { ["role"] = "user", ["content"] = "Hi {{ there }}" },
            new Dictionary<string, object?> { ["role"] = "assistant", ["content"] = "Hello." },
            new Dictionary<string, object?> { ["role"] = "user", ["content"] = "" },
        },
        ["add_generation_prompt"] = true,
        ["bos_token"] = "<s>",
        ["eos_token"] = "</s>",
    };

    /// <summary>A chat template: parsed, then rendered with a short conversation. Promises JinjaException.</summary>
    public static void Jinja(byte[] input)
    {
        var source = Encoding.UTF8.GetString(input);
        try { JinjaTemplate.Parse(source).Render(JinjaContext); }
        catch (JinjaException) { }
    }

    /// <summary>An uploaded archive: the first byte's low bit picks .zip (0) or .tar.gz (1), the rest is
    /// the archive, unpacked under small limits. Promises ArchiveException.</summary>
    public static void Archive(byte[] input)
    {
        var name = input.Length > 0 && (input[0] & 1) == 1 ? "fuzz.tar.gz" : "fuzz.zip";
        var limits = new ArchiveLimits { MaxBytes = 1 << 20, MaxEntries = 16, MaxHeaderBytes = 4096 };
        var sink = new byte[4096];
        try
        {
            AdapterArchive.Unpack(new MemoryStream(input, Math.Min(1, input.Length), Math.Max(0, input.Length - 1)), name, limits, (_, data) =>
            {
                while (data.Read(sink) > 0) { }
            });
        }
        catch (ArchiveException) { }
    }

    private static readonly Lazy<(JsonVocabulary Vocabulary, IReadOnlyList<int> Stop)> DefaultVocabulary = new(() =>
    {
        var tokenizer = Tokenizer.FromDirectory(DefaultModel.Directory);
        return (JsonVocabulary.For(tokenizer), tokenizer.EosTokenIds);
    });

    /// <summary>guided JSON: the bytes before the first 0 are a request's JSON schema (UTF-8), the rest the text the
    /// model has produced. The schema may be refused only with ArgumentException (a body that is not JSON at all
    /// never gets this far: the request reader refuses it). The recognizer then reads the text as far as it stays
    /// valid, and at that state the token mask over the default model's vocabulary must equal feeding every token
    /// on its own: a mask that differs is a crash.</summary>
    public static void GuidedJson(byte[] input)
    {
        int cut = Array.IndexOf(input, (byte)0);
        // Both parts decoded as the server decodes a request body (invalid bytes become U+FFFD).
        var schemaText = Encoding.UTF8.GetString(input, 0, cut < 0 ? input.Length : cut);
        var text = cut < 0 ? "" : Encoding.UTF8.GetString(input, cut + 1, input.Length - cut - 1);
        JsonSchema schema;
        // Handed over as a JSON string holding the schema (a form requests may use), so that text which is no
        // JSON at all still goes through the instrumented parser and gives AFL++ a trace.
        try { schema = JsonSchema.Parse(JsonSerializer.SerializeToElement(schemaText)); }
        catch (ArgumentException) { return; }
        var states = JsonStates.Start(schema.Root);
        foreach (var c in text)
        {
            if (states.Step(c.ToString()) is not { } next) break;
            states = next;
        }
        var (vocabulary, stop) = DefaultVocabulary.Value;
        var mask = vocabulary.ComputeMask(states, stop);
        var reference = vocabulary.MaskByFeeding(states, stop);
        int differs = Enumerable.Range(0, mask.Length).FirstOrDefault(id => mask[id] != reference[id], -1);
        if (differs >= 0) throw new InvalidOperationException($"guided JSON: the mask differs from feeding each token at token {differs}");
    }
}
