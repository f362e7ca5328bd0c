using System.Text.Json;
using PeftServe.Server.Serving;

namespace PeftServe.Server.Api;

/// <summary>vLLM's tokenizer endpoints, for clients that count or build prompts in token ids:
/// <c>POST /tokenize</c> with a prompt (or chat messages, through the chat template) and
/// <c>POST /detokenize</c> with token ids. "model" may name the base or any adapter: they share the
/// tokenizer, but an unknown name is a 404 as everywhere else.</summary>
public static class TokenizeEndpoints
{
    private static readonly string[] TokenizeFields = ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"];
    private static readonly string[] DetokenizeFields = ["model", "tokens"];

    public static void Map(WebApplication app)
    {
        app.MapPost("/tokenize", Tokenize);
        app.MapPost("/detokenize", Detokenize);
    }

    private static async Task<IResult> Tokenize(HttpContext context, GenerationService gen)
    {
        var root = OpenAiRequests.ParseBody(await OpenAiEndpoints.ReadBody(context));
        RefuseUnknown(root, TokenizeFields);
        gen.ResolveModel(OpenAiRequests.String(root, "model"));
        bool hasPrompt = root.TryGetProperty("prompt", out var prompt) && prompt.ValueKind != JsonValueKind.Null;
        bool hasMessages = root.TryGetProperty("messages", out var messages) && messages.ValueKind != JsonValueKind.Null;
        if (hasPrompt == hasMessages) throw new ApiException(400, "send either 'prompt' or 'messages'", hasPrompt ? "messages" : "prompt");
        int[] ids;
        if (hasPrompt)
        {
            if (prompt.ValueKind != JsonValueKind.String) throw new ApiException(400, "'prompt' must be a string", "prompt");
            ids = gen.TextPrompt(prompt.GetString()!, OpenAiRequests.Bool(root, "add_special_tokens") ?? true);
        }
        else
        {
            // As for chat completions: the template writes its own special tokens.
            if (OpenAiRequests.Bool(root, "add_special_tokens") == true)
                throw new ApiException(400, "'add_special_tokens' applies to 'prompt'; the chat template writes its own", "add_special_tokens");
            ids = gen.ChatPrompt(OpenAiRequests.Messages(root), OpenAiRequests.Bool(root, "add_generation_prompt") ?? true);
        }
        bool strings = OpenAiRequests.Bool(root, "return_token_strs") ?? false;
        return Results.Ok(new
        {
            count = ids.Length,
            max_model_len = gen.MaxSequenceLength,
            tokens = ids,
            token_strs = strings ? ids.Select(gen.TokenText).ToArray() : null,
        });
    }

    private static async Task<IResult> Detokenize(HttpContext context, GenerationService gen)
    {
        var root = OpenAiRequests.ParseBody(await OpenAiEndpoints.ReadBody(context));
        RefuseUnknown(root, DetokenizeFields);
        gen.ResolveModel(OpenAiRequests.String(root, "model"));
        if (!root.TryGetProperty("tokens", out var tokens) || tokens.ValueKind != JsonValueKind.Array)
            throw new ApiException(400, "'tokens' is required and must be a list of token ids", "tokens");
        var ids = tokens.EnumerateArray().Select(t => t.ValueKind == JsonValueKind.Number && t.TryGetInt32(out var id) && id >= 0 && id < gen.VocabSize ? id
            : throw new ApiException(400, $"'tokens' must hold token ids from 0 to {gen.VocabSize - 1}", "tokens")).ToList();
        return Results.Ok(new { prompt = gen.Decode(ids) });
    }

    private static void RefuseUnknown(JsonElement root, string[] known)
    {
        foreach (var p in root.EnumerateObject())
            if (!known.Contains(p.Name))
                throw new ApiException(400, $"unrecognized request argument '{p.Name}'", p.Name, "unsupported_parameter");
    }
}
