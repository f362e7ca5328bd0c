using System.Runtime.CompilerServices;
using Microsoft.AspNetCore.SignalR;
using PeftServe.Core.Templates;
using PeftServe.Server.Api;
using PeftServe.Server.Serving;

namespace PeftServe.Server.Hubs;

public sealed class HubMessage
{
    public string Role { get; set; } = "user";
    public string Content { get; set; } = "";
}

/// <summary>A chat for <see cref="ChatHub.StreamChat"/>: the model id (base or adapter) and the
/// OpenAI sampling settings, in camelCase as SignalR's JSON protocol writes them.</summary>
public sealed class ChatStreamRequest
{
    public string? Model { get; set; }
    public List<HubMessage> Messages { get; set; } = [];
    public int? MaxTokens { get; set; }
    public float? Temperature { get; set; }
    public float? TopP { get; set; }
    public int? TopK { get; set; }
    public long? Seed { get; set; }
    public List<string>? Stop { get; set; }
    public bool IgnoreEos { get; set; }
}

/// <summary>One streamed token: its text (may be empty while a character is incomplete), its id and
/// index, and on the last item the finish reason ("stop" or "length") and the token counts.</summary>
public sealed record ChatToken(string Text, int TokenId, int Index, string? FinishReason, int? PromptTokens, int? CompletionTokens);

/// <summary>The SignalR hub at /hubs/chat. StreamChat yields tokens as the engine produces them;
/// cancelling the stream on the client (or disconnecting) cancels the request in the engine.</summary>
public sealed class ChatHub(GenerationService generation) : Hub
{
    public async IAsyncEnumerable<ChatToken> StreamChat(ChatStreamRequest request, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        Generation run;
        try
        {
            if (request is null || request.Messages is null || request.Messages.Count == 0) throw new ApiException(400, "messages must hold at least one message", "messages");
            var settings = new GenerationSettings
            {
                Model = request.Model,
                MaxTokens = request.MaxTokens,
                Temperature = request.Temperature ?? 1f,
                TopP = request.TopP ?? 1f,
                TopK = OpenAiRequests.TopK(request.TopK),
                Seed = request.Seed,
                Stop = request.Stop ?? [],
                IgnoreEos = request.IgnoreEos,
            };
            OpenAiRequests.Check(settings);
            var (modelId, adapter) = generation.ResolveModel(settings.Model);
            var prompt = generation.ChatPrompt(request.Messages.Select(m => new ChatMessage(m.Role, m.Content)).ToList());
            var engineRequest = generation.Build(settings, prompt, adapter, generation.DefaultChatMaxTokens);
            run = generation.Start("signalr", modelId, engineRequest, cancellationToken);
        }
        catch (ApiException e) { throw new HubException($"{e.Status} {e.Code ?? e.Param ?? "error"}: {e.Message}"); }

        await using var tokens = run.GetAsyncEnumerator(cancellationToken);
        while (true)
        {
            try
            {
                if (!await tokens.MoveNextAsync()) yield break;
            }
            catch (ApiException e) { throw new HubException($"{e.Status} {e.Code ?? "error"}: {e.Message}"); }
            var ev = tokens.Current;
            bool last = ev.Finish is not null;
            yield return new ChatToken(ev.Text, ev.TokenId, ev.Index, last ? OpenAiEndpoints.FinishName(ev.Finish!.Value) : null,
                last ? run.PromptTokens : null, last ? run.CompletionTokens : null);
        }
    }
}
