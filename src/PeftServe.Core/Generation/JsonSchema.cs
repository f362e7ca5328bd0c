using System.Text.Json;
using System.Text.Json.Nodes;

namespace PeftServe.Core.Generation;

/// <summary>
/// The part of JSON Schema that guided decoding holds the output to (OpenAI's <c>json_schema</c> response format,
/// vLLM's <c>guided_json</c>, LoRAX's <c>response_format.schema</c>): <c>type</c> (one or a list), <c>properties</c>,
/// <c>required</c>, <c>additionalProperties</c> (true, false or a schema), <c>items</c>, <c>enum</c>, <c>const</c>,
/// <c>anyOf</c>/<c>oneOf</c> (oneOf is held as anyOf: the output matches at least one), <c>allOf</c> of one schema,
/// and local <c>$ref</c>s into <c>$defs</c>/<c>definitions</c>. Annotations (title, description, default, examples,
/// format, ...) are read past. Any other keyword (pattern, minLength, minimum, ...) is refused by name: a constraint
/// that was asked for and not held would be worse. The root must be an object, as OpenAI requires.
/// </summary>
public sealed class JsonSchema
{
    /// <summary>The value a schema allows, compiled. Compared by reference (the recognizer's states hold them).</summary>
    internal sealed class Node
    {
        private static int _next;
        /// <summary>A number of its own, for the recognizer's state signatures.</summary>
        public readonly int Id = Interlocked.Increment(ref _next);
        public JsonTypes Types = JsonTypes.All;
        /// <summary>Property schemas by name (null: none named).</summary>
        public Dictionary<string, Node>? Properties;
        public HashSet<string> Required = [];
        /// <summary>Schema of properties not named (null: none allowed).</summary>
        public Node? Additional;
        public Node? Items;
        /// <summary>The values allowed, each as its canonical JSON text (null: any value of the types).</summary>
        public List<string>? Enum;
        /// <summary>anyOf/oneOf alternatives (null: this node itself).</summary>
        public List<Node>? Alternatives;

        public Node ItemsOrAny => Items ?? Any;
        public Node? ValueOf(string key) => Properties is not null && Properties.TryGetValue(key, out var n) ? n : Additional;
        public bool AllowsKey(string key) => (Properties?.ContainsKey(key) ?? false) || Additional is not null;
    }

    [Flags]
    internal enum JsonTypes
    {
        Object = 1, Array = 2, String = 4, Number = 8, Integer = 16, Boolean = 32, Null = 64,
        All = Object | Array | String | Number | Integer | Boolean | Null,
    }

    /// <summary>Any JSON value (an object's properties and an array's items when the schema says nothing).</summary>
    internal static readonly Node Any = CreateAny();

    private static Node CreateAny()
    {
        var any = new Node();
        any.Additional = any;
        any.Items = any;
        return any;
    }

    private static readonly HashSet<string> Annotations =
    [
        "title", "description", "default", "examples", "format", "$schema", "$id", "$comment", "deprecated", "readOnly",
        "writeOnly", "contentMediaType", "contentEncoding", "$defs", "definitions", "strict", "name",
    ];

    /// <summary>Limits that keep one request's schema from costing the engine much (each mask runs the recognizer over
    /// the vocabulary): properties per object, values per enum, anyOf/oneOf alternatives in all.</summary>
    public const int MaxProperties = 256, MaxEnumValues = 256, MaxAlternatives = 64;

    internal Node Root { get; }
    private int _alternatives;

    private readonly JsonObject _document;
    private readonly Dictionary<string, Node> _refs = new(StringComparer.Ordinal);

    private JsonSchema(JsonObject document)
    {
        _document = document;
        Root = Compile(document, "schema", depth: 0);
        if (Root.Alternatives is not null || Root.Types != JsonTypes.Object)
            throw new ArgumentException("the schema's root must be an object (\"type\": \"object\"), as OpenAI's structured outputs require");
    }

    /// <summary>The schema for JSON mode: any object.</summary>
    public static JsonSchema AnyObject { get; } = new(new JsonObject { ["type"] = "object" });

    /// <summary>Compiles a schema; an <see cref="ArgumentException"/> names what it cannot hold (or what is malformed).</summary>
    public static JsonSchema Parse(JsonNode? schema)
    {
        if (schema is not JsonObject o) throw new ArgumentException("the schema must be a JSON object");
        // A value of the wrong kind where a name or list is expected ("type": 5) surfaces from the JSON accessors.
        try { return new JsonSchema((JsonObject)o.DeepClone()); }
        catch (Exception e) when (e is InvalidOperationException or FormatException) { throw new ArgumentException($"malformed schema: {e.Message}", e); }
    }

    /// <summary>A schema as a request carries it: an object, or a string holding one (vLLM accepts both).</summary>
    public static JsonSchema Parse(JsonElement schema)
    {
        JsonNode? node;
        try { node = JsonNode.Parse(schema.ValueKind == JsonValueKind.String ? schema.GetString()! : schema.GetRawText()); }
        catch (JsonException e) { throw new ArgumentException($"the schema is not valid JSON: {e.Message}", e); }
        // A string that is no valid text (a lone UTF-16 surrogate, invalid UTF-8) cannot be read as one.
        catch (InvalidOperationException e) { throw new ArgumentException($"the schema is not valid text: {e.Message}", e); }
        return Parse(node);
    }

    private Node Compile(JsonNode? node, string path, int depth)
    {
        if (depth > 64) throw new ArgumentException($"{path}: the schema nests too deeply");
        switch (node)
        {
            case JsonValue v when v.GetValueKind() == JsonValueKind.True: return Any;
            case JsonValue v when v.GetValueKind() == JsonValueKind.False: throw new ArgumentException($"{path}: a false schema allows nothing");
            case not JsonObject: throw new ArgumentException($"{path}: a schema must be an object");
        }
        var o = (JsonObject)node;
        if (o["$ref"] is { } reference)
        {
            if (o.Count(p => !Annotations.Contains(p.Key)) > 1) throw new ArgumentException($"{path}: $ref beside other keywords is not supported");
            return Ref(reference.GetValue<string>(), path, depth);
        }
        var n = new Node();
        foreach (var (key, value) in o)
        {
            switch (key)
            {
                case "type": n.Types = Types(value, path); break;
                case "properties":
                    if (value is not JsonObject props) throw new ArgumentException($"{path}.properties must be an object");
                    if (props.Count > MaxProperties) throw new ArgumentException($"{path}.properties names {props.Count} properties; at most {MaxProperties} are supported");
                    n.Properties = props.ToDictionary(p => p.Key, p => Compile(p.Value, $"{path}.properties.{p.Key}", depth + 1), StringComparer.Ordinal);
                    foreach (var name in n.Properties.Keys) CheckPlain(name, $"{path}.properties");
                    break;
                case "required":
                    n.Required = (value as JsonArray ?? throw new ArgumentException($"{path}.required must be a list"))
                        .Select(x => x?.GetValue<string>() ?? throw new ArgumentException($"{path}.required holds a null")).ToHashSet(StringComparer.Ordinal);
                    break;
                case "additionalProperties": break;   // below, once properties are known
                case "items": n.Items = Compile(value, $"{path}.items", depth + 1); break;
                case "enum":
                    n.Enum = (value as JsonArray ?? throw new ArgumentException($"{path}.enum must be a list")).Select(x => Canonical(x, $"{path}.enum")).ToList();
                    if (n.Enum.Count == 0) throw new ArgumentException($"{path}.enum is empty: it allows nothing");
                    if (n.Enum.Count > MaxEnumValues) throw new ArgumentException($"{path}.enum has {n.Enum.Count} values; at most {MaxEnumValues} are supported");
                    break;
                case "const": n.Enum = [Canonical(value, $"{path}.const")]; break;
                case "anyOf" or "oneOf":
                    n.Alternatives = (value as JsonArray ?? throw new ArgumentException($"{path}.{key} must be a list"))
                        .Select((x, i) => Compile(x, $"{path}.{key}[{i}]", depth + 1)).SelectMany(a => a.Alternatives ?? [a]).ToList();
                    if (n.Alternatives.Count == 0) throw new ArgumentException($"{path}.{key} is empty");
                    // Alternatives multiply the recognizer's live states: bounded in all, so no schema makes a mask explode.
                    if ((_alternatives += n.Alternatives.Count) > MaxAlternatives)
                        throw new ArgumentException($"{path}: the schema has more than {MaxAlternatives} anyOf/oneOf alternatives in all");
                    break;
                case "allOf":
                    if (value is not JsonArray { Count: 1 } single) throw new ArgumentException($"{path}.allOf of more than one schema is not supported");
                    return Compile(single[0], $"{path}.allOf[0]", depth + 1);
                default:
                    if (!Annotations.Contains(key)) throw new ArgumentException($"{path}: the schema keyword '{key}' is not supported (guided decoding would not hold it)");
                    break;
            }
        }
        if (n.Alternatives is not null && o.Any(p => p.Key is "type" or "properties" or "items" or "enum" or "const"))
            throw new ArgumentException($"{path}: anyOf/oneOf beside other constraints is not supported");
        // JSON Schema's default: properties not named are allowed. OpenAI's strict mode says false; both are honoured.
        n.Additional = o["additionalProperties"] switch
        {
            null => Any,
            JsonValue v when v.GetValueKind() == JsonValueKind.False => null,
            var schema => Compile(schema, $"{path}.additionalProperties", depth + 1),
        };
        if (n.Properties is null && n.Additional is null && n.Required.Count > 0)
            throw new ArgumentException($"{path}: required properties that no property allows");
        foreach (var name in n.Required)
            if (!n.AllowsKey(name)) throw new ArgumentException($"{path}.required names '{name}', which the schema does not allow");
        if (n.Enum is not null) n.Types = JsonTypes.All;   // the values say it
        return n;
    }

    private Node Ref(string reference, string path, int depth)
    {
        if (_refs.TryGetValue(reference, out var known)) return known;
        var parts = reference.Split('/');
        if (parts.Length != 3 || parts[0] != "#" || parts[1] is not ("$defs" or "definitions"))
            throw new ArgumentException($"{path}: only local references into $defs or definitions are supported (got '{reference}')");
        var target = _document[parts[1]]?[parts[2]] ?? throw new ArgumentException($"{path}: '{reference}' names no definition");
        // A placeholder first, so that a definition that refers to itself compiles to a cycle.
        var node = new Node();
        _refs[reference] = node;
        var compiled = Compile(target, reference, depth + 1);
        node.Types = compiled.Types;
        node.Properties = compiled.Properties;
        node.Required = compiled.Required;
        node.Additional = compiled.Additional;
        node.Items = compiled.Items;
        node.Enum = compiled.Enum;
        node.Alternatives = compiled.Alternatives;
        return node;
    }

    private static JsonTypes Types(JsonNode? value, string path)
    {
        static JsonTypes One(string? name, string path) => name switch
        {
            "object" => JsonTypes.Object,
            "array" => JsonTypes.Array,
            "string" => JsonTypes.String,
            "number" => JsonTypes.Number | JsonTypes.Integer,
            "integer" => JsonTypes.Integer,
            "boolean" => JsonTypes.Boolean,
            "null" => JsonTypes.Null,
            _ => throw new ArgumentException($"{path}.type '{name}' is not a JSON Schema type"),
        };
        return value switch
        {
            JsonValue v => One(v.GetValue<string>(), path),
            JsonArray a when a.Count > 0 => a.Select(x => One(x?.GetValue<string>(), path)).Aggregate((x, y) => x | y),
            _ => throw new ArgumentException($"{path}.type must be a type name or a list of them"),
        };
    }

    /// <summary>An enum or const value as the text the output must hold (strings without escapes only).</summary>
    private static string Canonical(JsonNode? value, string path)
    {
        if (value is JsonValue v && v.GetValueKind() == JsonValueKind.String) CheckPlain(v.GetValue<string>(), path);
        if (value is JsonObject or JsonArray) throw new ArgumentException($"{path}: objects and lists as enum values are not supported");
        return value?.ToJsonString() ?? "null";
    }

    /// <summary>Names and enum strings are matched as written: no quote, backslash or control character in them.</summary>
    private static void CheckPlain(string text, string path)
    {
        if (text.Any(c => c is '"' or '\\' || c < ' ' || c > '\u007e'))
            throw new ArgumentException($"{path}: '{text}' holds characters that JSON would escape; only plain ASCII names and enum strings are supported");
    }
}
