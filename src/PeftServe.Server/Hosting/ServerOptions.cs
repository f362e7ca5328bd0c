namespace PeftServe.Server.Hosting;

/// <summary>The "PeftServe" configuration section (appsettings.json, PEFTSERVE__* variables, switches).</summary>
public sealed class ServerOptions
{
    public const string Section = "PeftServe";

    /// <summary>Hugging Face model folder; empty means the built-in tiny Llama.</summary>
    public string? Model { get; set; }
    /// <summary>The id clients use for the base model; default: the folder's name.</summary>
    public string? ModelName { get; set; }
    public string Device { get; set; } = "cpu";
    public string? DType { get; set; }
    public string AdapterStore { get; set; } = "adapters";
    /// <summary>Bearer keys for the API; empty means no authentication (then only localhost is served).</summary>
    public List<string> ApiKeys { get; set; } = [];
    /// <summary>Keys that may also upload and delete adapters.</summary>
    public List<string> AdminKeys { get; set; } = [];
    /// <summary>Largest adapter upload, in bytes.</summary>
    public long MaxUploadBytes { get; set; } = 512L << 20;

    public bool AuthEnabled => ApiKeys.Count > 0 || AdminKeys.Count > 0;
}
