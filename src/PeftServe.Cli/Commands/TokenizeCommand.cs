using System.CommandLine;
using System.Text.Json;
using PeftServe.Core.Templates;

namespace PeftServe.Cli.Commands;

/// <summary><c>tokenize</c>: text or a chat (through the model's chat template) to token ids.</summary>
internal static class TokenizeCommand
{
    public static Command Create()
    {
        var model = new Option<string?>("--model")
        {
            Description = "model folder, or a folder holding only tokenizer.json and tokenizer_config.json; default: the built-in tiny Llama",
        };
        var text = new Option<string?>("--text") { Description = "text to encode (special tokens added as Hugging Face adds them)" };
        var chat = new Option<string?>("--chat") { Description = "JSON file with a list of {\"role\", \"content\"} messages, rendered with the chat template" };
        var generationPrompt = new Option<bool>("--add-generation-prompt") { Description = "end the chat with the assistant's turn header" };

        var command = new Command("tokenize", "Print the token ids of a text or a chat as a JSON array") { model, text, chat, generationPrompt };
        command.Validators.Add(r =>
        {
            if ((r.GetValue(text) is null) == (r.GetValue(chat) is null)) r.AddError("give exactly one of --text or --chat");
            if (r.GetValue(generationPrompt) && r.GetValue(chat) is null) r.AddError("--add-generation-prompt needs --chat");
        });
        command.SetAction(parse => CommonOptions.Run(() =>
        {
            var tokenizer = CommonOptions.LoadTokenizer(parse.GetValue(model));
            int[] ids;
            if (parse.GetValue(text) is { } plain) ids = tokenizer.Encode(plain, addSpecialTokens: true);
            else
            {
                var path = parse.GetValue(chat)!;
                var messages = ReadMessages(path);
                var template = tokenizer.ChatTemplate ?? throw new InvalidDataException("the tokenizer has no chat_template");
                var rendered = ChatTemplate.Render(template, messages, parse.GetValue(generationPrompt), new Dictionary<string, object?>
                {
                    ["bos_token"] = tokenizer.BosToken ?? "",
                    ["eos_token"] = tokenizer.EosToken ?? "",
                });
                Console.Error.Write(rendered);
                Console.Error.WriteLine();
                // As transformers does: the template writes its own special tokens, none are added.
                ids = tokenizer.Encode(rendered, addSpecialTokens: false);
            }
            Console.WriteLine(JsonSerializer.Serialize(ids));
            return 0;
        }));
        return command;
    }

    private static List<ChatMessage> ReadMessages(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"--chat {path}: no such file");
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var list = doc.RootElement.ValueKind == JsonValueKind.Object && doc.RootElement.TryGetProperty("messages", out var m) ? m : doc.RootElement;
        if (list.ValueKind != JsonValueKind.Array) throw new InvalidDataException($"--chat {path}: expected a JSON array of messages");
        return list.EnumerateArray().Select((e, i) =>
            e.ValueKind == JsonValueKind.Object && e.TryGetProperty("role", out var role) && e.TryGetProperty("content", out var content)
                && role.ValueKind == JsonValueKind.String && content.ValueKind == JsonValueKind.String
                ? new ChatMessage(role.GetString()!, content.GetString()!)
                : throw new InvalidDataException($"--chat {path}: message {i} needs string \"role\" and \"content\"")).ToList();
    }
}
