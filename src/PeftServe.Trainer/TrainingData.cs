using System.Text.Json;
using PeftServe.Core.Templates;
using PeftServe.Core.Tokenization;

namespace PeftServe.Trainer;

/// <summary>One tokenized training example: token ids and, per token, whether the loss counts it
/// (predicting token j from tokens 0..j-1). Plain text counts every token after the first;
/// prompt/completion and chat examples count only completion / assistant tokens.</summary>
public sealed record Example(int[] Ids, bool[] Loss)
{
    public int LossTokens => Loss.Count(x => x);
}

/// <summary>Reads JSONL training data in three shapes, one object per line:
/// <c>{"text": ...}</c>, <c>{"prompt": ..., "completion": ...}</c>, or
/// <c>{"messages": [{"role": ..., "content": ...}, ...]}</c> (rendered with the model's chat template).</summary>
public static class TrainingData
{
    public static List<Example> Load(string path, Tokenizer tokenizer, int maxLength)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"--data {path}: no such file");
        var examples = new List<Example>();
        int lineNo = 0;
        foreach (var line in File.ReadLines(path))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            JsonDocument doc;
            try { doc = JsonDocument.Parse(line); }
            catch (JsonException e) { throw new InvalidDataException($"{path}:{lineNo}: invalid JSON: {e.Message}"); }
            using (doc)
            {
                var root = doc.RootElement;
                if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{path}:{lineNo}: each line must be a JSON object");
                var ex = Tokenize(root, tokenizer, $"{path}:{lineNo}");
                if (ex.Ids.Length > maxLength) ex = new Example(ex.Ids[..maxLength], ex.Loss[..maxLength]);
                if (ex.LossTokens > 0) examples.Add(ex);
            }
        }
        if (examples.Count == 0) throw new InvalidDataException($"{path}: no example with any token to learn");
        return examples;
    }

    public static Example Tokenize(JsonElement root, Tokenizer tokenizer, string where)
    {
        string? Str(string key) => root.TryGetProperty(key, out var v) ? v.ValueKind == JsonValueKind.String ? v.GetString()
            : throw new InvalidDataException($"{where}: '{key}' must be a string") : null;

        var eos = tokenizer.EosTokenIds.Count > 0 ? [tokenizer.EosTokenIds[0]] : Array.Empty<int>();
        if (Str("text") is { } text)
        {
            var ids = tokenizer.Encode(text, addSpecialTokens: true).Concat(eos).ToArray();
            return new Example(ids, ids.Select((_, i) => i > 0).ToArray());
        }
        if (Str("prompt") is { } prompt)
        {
            var completion = Str("completion") ?? throw new InvalidDataException($"{where}: 'prompt' without 'completion'");
            var p = tokenizer.Encode(prompt, addSpecialTokens: true);
            var c = tokenizer.Encode(completion, addSpecialTokens: false).Concat(eos).ToArray();
            return new Example([.. p, .. c], [.. p.Select(_ => false), .. c.Select(_ => true)]);
        }
        if (root.TryGetProperty("messages", out var msgs))
        {
            if (msgs.ValueKind != JsonValueKind.Array) throw new InvalidDataException($"{where}: 'messages' must be an array");
            var messages = msgs.EnumerateArray().Select(m =>
                new ChatMessage(
                    m.TryGetProperty("role", out var r) && r.ValueKind == JsonValueKind.String ? r.GetString()! : throw new InvalidDataException($"{where}: a message lacks a string 'role'"),
                    m.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String ? c.GetString()! : throw new InvalidDataException($"{where}: a message lacks a string 'content'")))
                .ToList();
            return Chat(messages, tokenizer, where);
        }
        throw new InvalidDataException($"{where}: expected 'text', 'prompt'+'completion' or 'messages'");
    }

    /// <summary>The conversation rendered with the chat template; the loss covers what each assistant
    /// turn adds to the rendering (its content and end-of-turn marks), found by rendering the
    /// conversation up to each turn (with the generation prompt before an assistant turn).</summary>
    public static Example Chat(IReadOnlyList<ChatMessage> messages, Tokenizer tokenizer, string where)
    {
        var template = tokenizer.ChatTemplate ?? throw new InvalidDataException($"{where}: chat data needs a chat_template in the model's tokenizer_config.json");
        var extra = new Dictionary<string, object?> { ["bos_token"] = tokenizer.BosToken ?? "", ["eos_token"] = tokenizer.EosToken ?? "" };
        var ids = new List<int>();
        var loss = new List<bool>();
        string done = "";
        void Append(string upTo, bool learn)
        {
            if (!upTo.StartsWith(done, StringComparison.Ordinal))
                throw new InvalidDataException($"{where}: the chat template does not render the conversation incrementally; cannot find the assistant tokens");
            var piece = upTo[done.Length..];
            var pieceIds = tokenizer.Encode(piece, addSpecialTokens: false);
            ids.AddRange(pieceIds);
            loss.AddRange(pieceIds.Select(_ => learn));
            done = upTo;
        }
        for (int i = 0; i < messages.Count; i++)
        {
            bool assistant = messages[i].Role == "assistant";
            if (assistant) Append(ChatTemplate.Render(template, messages.Take(i).ToList(), addGenerationPrompt: true, extra), learn: false);
            Append(ChatTemplate.Render(template, messages.Take(i + 1).ToList(), addGenerationPrompt: false, extra), learn: assistant);
        }
        if (ids.Count > 0) loss[0] = false;
        return new Example([.. ids], [.. loss]);
    }

    /// <summary>Packing: every example's tokens end to end, cut into blocks of <paramref name="blockLength"/>
    /// (the last shorter block is kept). Blocks attend across example boundaries, as simple packing does.</summary>
    public static List<Example> Pack(IEnumerable<Example> examples, int blockLength)
    {
        var ids = new List<int>();
        var loss = new List<bool>();
        foreach (var e in examples) { ids.AddRange(e.Ids); loss.AddRange(e.Loss); }
        var blocks = new List<Example>();
        for (int s = 0; s < ids.Count; s += blockLength)
        {
            int n = Math.Min(blockLength, ids.Count - s);
            if (n < 2) break;
            var l = loss.GetRange(s, n).ToArray();
            l[0] = false;
            var block = new Example(ids.GetRange(s, n).ToArray(), l);
            if (block.LossTokens > 0) blocks.Add(block);
        }
        return blocks;
    }

    /// <summary>Splits off a validation set: the last <paramref name="fraction"/> of a seeded shuffle
    /// (at least one example when the fraction is positive and there are two or more examples).</summary>
    public static (List<Example> Train, List<Example> Validation) Split(IReadOnlyList<Example> all, double fraction, int seed)
    {
        var order = Enumerable.Range(0, all.Count).ToArray();
        new Random(seed).Shuffle(order);
        int nVal = fraction <= 0 || all.Count < 2 ? 0 : Math.Clamp((int)Math.Round(all.Count * fraction), 1, all.Count - 1);
        return (order[..^nVal].Select(i => all[i]).ToList(), order[^nVal..].Select(i => all[i]).ToList());
    }
}
