using System.Text;
using System.Text.Json;

namespace PeftServe.Server.Api;

/// <summary>Server-sent events as OpenAI streams them: one "data: JSON" event per chunk, then "data: [DONE]".</summary>
public sealed class SseWriter(HttpResponse response)
{
    private static readonly JsonSerializerOptions Json = new() { DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.Never };
    private static readonly byte[] Done = "data: [DONE]\n\n"u8.ToArray();
    private bool _started;

    public bool Started => _started;

    public async Task StartAsync(CancellationToken cancellation)
    {
        if (_started) return;
        _started = true;
        response.StatusCode = StatusCodes.Status200OK;
        response.ContentType = "text/event-stream; charset=utf-8";
        response.Headers.CacheControl = "no-cache";
        response.Headers["X-Accel-Buffering"] = "no";
        await response.StartAsync(cancellation);
    }

    public async Task WriteAsync(object chunk, CancellationToken cancellation)
    {
        await StartAsync(cancellation);
        var bytes = Encoding.UTF8.GetBytes("data: " + JsonSerializer.Serialize(chunk, Json) + "\n\n");
        await response.Body.WriteAsync(bytes, cancellation);
        await response.Body.FlushAsync(cancellation);
    }

    public async Task DoneAsync(CancellationToken cancellation)
    {
        await StartAsync(cancellation);
        await response.Body.WriteAsync(Done, cancellation);
        await response.Body.FlushAsync(cancellation);
    }
}
