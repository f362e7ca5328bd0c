using System.Collections.Concurrent;

namespace PeftServe.Core.Templates;

/// <summary>One chat message.</summary>
public sealed record ChatMessage(string Role, string Content);

/// <summary>Renders a conversation with a model's chat template the way transformers'
/// apply_chat_template does (trim_blocks and lstrip_blocks on; messages, add_generation_prompt and
/// the special tokens in the context). Parsed templates are cached by their source.</summary>
public static class ChatTemplate
{
    private static readonly ConcurrentDictionary<string, JinjaTemplate> Cache = new();

    public static string Render(string template, IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt,
        IReadOnlyDictionary<string, object?>? extra = null)
    {
        var compiled = Cache.GetOrAdd(template, t => JinjaTemplate.Parse(t));
        var context = new Dictionary<string, object?>
        {
            ["messages"] = messages.Select(m => (object?)new Dictionary<string, object?> { ["role"] = m.Role, ["content"] = m.Content }).ToList(),
            ["add_generation_prompt"] = addGenerationPrompt,
        };
        if (extra is not null) foreach (var (k, v) in extra) context[k] = v;
        return compiled.Render(context);
    }
}
