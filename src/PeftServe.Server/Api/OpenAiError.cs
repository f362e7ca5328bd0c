using System.Text.Json.Serialization;

namespace PeftServe.Server.Api;

/// <summary>OpenAI's error body: {"error": {"message", "type", "param", "code"}}.</summary>
public sealed record OpenAiError(
    [property: JsonPropertyName("message")] string Message,
    [property: JsonPropertyName("type")] string Type,
    [property: JsonPropertyName("param")] string? Param = null,
    [property: JsonPropertyName("code")] string? Code = null)
{
    public static IResult Result(ApiException e) => Result(e.Status, e.Message, e.Param, e.Code);

    public static IResult Result(int status, string message, string? param = null, string? code = null)
    {
        var type = status switch
        {
            400 or 404 or 409 or 413 or 415 or 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_exceeded",
            503 => "service_unavailable",
            _ => "server_error",
        };
        return Results.Json(new { error = new OpenAiError(message, type, param, code) }, statusCode: status);
    }
}

/// <summary>A request the API refuses; the middleware turns it into an OpenAI-style error.</summary>
public sealed class ApiException(int status, string message, string? param = null, string? code = null) : Exception(message)
{
    public int Status { get; } = status;
    public string? Param { get; } = param;
    public string? Code { get; } = code;
    /// <summary>Sent as Retry-After (429 and 503).</summary>
    public int? RetryAfterSeconds { get; init; }
}
