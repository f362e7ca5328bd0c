using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace PeftServe.Core.Adapters;

/// <summary>PEFT's ways of naming the decoder modules an adapter touches, read from adapter_config.json
/// so that the config can be checked against the tensors the file holds:
/// <list type="bullet">
/// <item><c>target_modules</c> (and <c>feedforward_modules</c>, <c>exclude_modules</c>): a list of names,
/// each matching a module whose full name is that name or ends in ".name"; or one string, a regular
/// expression the full name must match entirely; or "all-linear".</item>
/// <item><c>layers_to_transform</c>: an integer or a list of them, the only layers targeted.</item>
/// <item><c>rank_pattern</c> / <c>alpha_pattern</c>: regular-expression keys; a key selects a module whose
/// full name ends in it (after a dot or at the start), and the first key that does wins.</item>
/// </list>
/// Config regexes come from uploads, so they run on .NET's non-backtracking engine (time linear in
/// the input, whatever the pattern) with a timeout as well; patterns it cannot run are refused.</summary>
public sealed class ModuleSelection
{
    /// <summary>The longest pattern accepted (PEFT's are module names, a few dozen characters).</summary>
    public const int MaxPatternLength = 512;
    private static readonly TimeSpan MatchTimeout = TimeSpan.FromMilliseconds(100);

    private readonly HashSet<string>? _names;
    private readonly Regex? _regex;
    private readonly bool _allLinear;
    private readonly string _where, _key;

    /// <summary>How the config wrote it, for error messages.</summary>
    public string Description { get; }

    private ModuleSelection(string where, string key, HashSet<string>? names, Regex? regex, bool allLinear, string description)
    {
        _where = where;
        _key = key;
        _names = names;
        _regex = regex;
        _allLinear = allLinear;
        Description = description;
    }

    /// <summary>The selection under <paramref name="key"/>, or null when the key is absent or null.</summary>
    public static ModuleSelection? Read(AdapterFolder f, string key)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        switch (f.Config[key])
        {
            case null:
                return null;
            case JsonValue v when v.TryGetValue<string>(out var s):
                if (s == "all-linear") return new ModuleSelection(where, key, null, null, allLinear: true, "\"all-linear\"");
                return new ModuleSelection(where, key, null, Compile(where, key, s, anchored: true), false, $"\"{Shorten(s)}\"");
            case JsonArray list:
                var names = new HashSet<string>(StringComparer.Ordinal);
                foreach (var item in list)
                {
                    if (item is not JsonValue iv || !iv.TryGetValue<string>(out var name) || name.Length == 0)
                        throw new AdapterException($"{where}: '{key}' must be a list of module names (strings), but holds {Describe(item)}");
                    names.Add(name);
                }
                return new ModuleSelection(where, key, names, null, false, "[" + string.Join(", ", names.Select(n => $"\"{Shorten(n)}\"")) + "]");
            default:
                throw new AdapterException($"{where}: '{key}' must be a string or a list of module names");
        }
    }

    /// <summary>Whether the module with this full name ("model.layers.0.self_attn.q_proj") is selected.</summary>
    public bool Matches(string fullName)
    {
        if (_allLinear) return true;   // every module an adapter of ours can name is a decoder linear layer
        if (_names is not null)
        {
            foreach (var n in _names)
                if (fullName == n || fullName.EndsWith("." + n, StringComparison.Ordinal)) return true;
            return false;
        }
        return IsMatch(_regex!, fullName, _where, _key);
    }

    /// <summary>layers_to_transform: null (every layer), or the set of layers named.</summary>
    public static HashSet<int>? ReadLayers(AdapterFolder f, string key, int numLayers)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        IEnumerable<JsonNode?> items;
        switch (f.Config[key])
        {
            case null: return null;
            case JsonArray a: items = a; break;
            case JsonValue v: items = [v]; break;
            default: throw new AdapterException($"{where}: '{key}' must be an integer or a list of integers");
        }
        var layers = new HashSet<int>();
        foreach (var item in items)
        {
            if (item is not JsonValue v || !v.TryGetValue<int>(out var layer))
                throw new AdapterException($"{where}: '{key}' must be an integer or a list of integers, but holds {Describe(item)}");
            if (layer < 0 || layer >= numLayers)
                throw new AdapterException($"{where}: '{key}' names layer {layer}, the base model has layers 0..{numLayers - 1}");
            layers.Add(layer);
        }
        return layers;
    }

    /// <summary>rank_pattern / alpha_pattern: (pattern, value) pairs in the config's order.</summary>
    public static IReadOnlyList<(Regex Pattern, string Key, double Value)> ReadPatterns(AdapterFolder f, string key, bool integers)
    {
        var where = $"{f.Path}/{AdapterFolder.ConfigFile}";
        switch (f.Config[key])
        {
            case null:
                return [];
            case JsonObject o:
                var result = new List<(Regex, string, double)>();
                foreach (var (pattern, value) in o)
                {
                    double number;
                    if (integers ? value is JsonValue iv && iv.TryGetValue<int>(out var i) && (number = i) >= 1
                                 : value is JsonValue dv && dv.TryGetValue<double>(out number))
                        result.Add((Compile(where, $"{key} key", pattern, anchored: false), pattern, number));
                    else
                        throw new AdapterException($"{where}: '{key}' entry \"{Shorten(pattern)}\" must be {(integers ? "a positive integer" : "a number")}, but is {Describe(value)}");
                }
                return result;
            default:
                throw new AdapterException($"{where}: '{key}' must be an object of pattern: value");
        }
    }

    /// <summary>The value of the first pattern that selects <paramref name="fullName"/>, if any.</summary>
    public static double? Lookup(IReadOnlyList<(Regex Pattern, string Key, double Value)> patterns, string fullName, string where, string key)
    {
        foreach (var (pattern, _, value) in patterns)
            if (IsMatch(pattern, fullName, where, key)) return value;
        return null;
    }

    private static Regex Compile(string where, string key, string pattern, bool anchored)
    {
        if (pattern.Length > MaxPatternLength)
            throw new AdapterException($"{where}: {key} \"{Shorten(pattern)}\" is {pattern.Length} characters long (at most {MaxPatternLength})");
        // target_modules as a string must match the whole name (re.fullmatch); a pattern key matches the
        // name's end, after a dot or from the start.
        var full = anchored ? $"^(?:{pattern})$" : $"^(?:.*\\.)?(?:{pattern})$";
        const RegexOptions options = RegexOptions.NonBacktracking | RegexOptions.CultureInvariant;
        try
        {
            _ = new Regex(pattern, options);   // alone first: "a)(b" must not pass by closing the wrapper's group
            return new Regex(full, options, MatchTimeout);
        }
        catch (RegexParseException e)
        {
            throw new AdapterException($"{where}: {key} \"{Shorten(pattern)}\" is not a valid regular expression ({e.Error} at offset {e.Offset})");
        }
        catch (NotSupportedException)
        {
            throw new AdapterException($"{where}: {key} \"{Shorten(pattern)}\" uses a construct this server does not run (backreferences, lookarounds, atomic groups)");
        }
    }

    private static bool IsMatch(Regex regex, string input, string where, string key)
    {
        try { return regex.IsMatch(input); }
        catch (RegexMatchTimeoutException)
        {
            throw new AdapterException($"{where}: matching '{key}' took longer than {MatchTimeout.TotalMilliseconds} ms; use plain module names");
        }
    }

    private static string Describe(JsonNode? node) => node switch
    {
        null => "null",
        JsonValue v when v.TryGetValue<string>(out var s) => $"\"{Shorten(s)}\"",
        JsonValue v => Shorten(v.ToJsonString()),
        JsonArray => "a list",
        _ => "an object",
    };

    private static string Shorten(string s) => s.Length <= 80 ? s : s[..77] + "...";
}
