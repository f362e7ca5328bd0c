using System.Text;

namespace PeftServe.Core.Templates;

/// <summary>A template or expression error, with the line and column where it was found.</summary>
public sealed class JinjaException(string message) : Exception(message);

/// <summary>Splits a template into text and tags ({{ }}, {% %}, {# #}) and applies Jinja's whitespace
/// control: "-" inside a tag strips whitespace on that side; trim_blocks drops the newline after a
/// block tag and lstrip_blocks the indentation before one (transformers renders chat templates with
/// both on).</summary>
internal static class TemplateLexer
{
    public enum Kind { Text, Expression, Statement }

    public sealed record Segment(Kind Kind, string Content, int Line, int Column);

    public static List<Segment> Split(string source, bool trimBlocks, bool lstripBlocks)
    {
        var raw = new List<(Kind Kind, string Content, bool TrimLeft, bool TrimRight, bool KeepLeft, int Pos)>();
        int i = 0;
        var text = new StringBuilder();
        int textStart = 0;
        while (i < source.Length)
        {
            if (source[i] == '{' && i + 1 < source.Length && source[i + 1] is '{' or '%' or '#')
            {
                char open = source[i + 1];
                string close = open == '{' ? "}}" : open == '%' ? "%}" : "#}";
                int start = i;
                i += 2;
                bool trimLeft = i < source.Length && source[i] == '-', keepLeft = i < source.Length && source[i] == '+';
                if (trimLeft || keepLeft) i++;
                int end = FindClose(source, i, close, open == '#');
                if (end < 0) throw Error(source, start, $"unclosed '{{{open}'");
                bool trimRight = end > i && source[end - 1] == '-';
                var content = source[i..(trimRight ? end - 1 : end)];
                raw.Add((Kind.Text, text.ToString(), false, false, false, textStart));
                text.Clear();
                if (open != '#') raw.Add((open == '{' ? Kind.Expression : Kind.Statement, content.Trim(), trimLeft, trimRight, keepLeft, start));
                else raw.Add((Kind.Statement, "#comment", trimLeft, trimRight, keepLeft, start));   // comments act as blocks for whitespace
                i = end + 2;
                textStart = i;
                // {% raw %}...{% endraw %}: everything up to endraw is text.
                if (open == '%' && content.Trim() == "raw")
                {
                    int endRaw = source.IndexOf("{%", i, StringComparison.Ordinal);
                    while (endRaw >= 0 && !source[(endRaw + 2)..].TrimStart('-', ' ').StartsWith("endraw", StringComparison.Ordinal))
                        endRaw = source.IndexOf("{%", endRaw + 2, StringComparison.Ordinal);
                    if (endRaw < 0) throw Error(source, start, "unclosed {% raw %}");
                    raw.RemoveAt(raw.Count - 1);
                    text.Append(source[i..endRaw]);
                    i = source.IndexOf("%}", endRaw, StringComparison.Ordinal) + 2;
                }
                continue;
            }
            text.Append(source[i++]);
        }
        raw.Add((Kind.Text, text.ToString(), false, false, false, textStart));

        // Whitespace control, applied to the text on each side of every tag.
        var texts = raw.Select(r => r.Content).ToArray();
        for (int k = 0; k < raw.Count; k++)
        {
            var r = raw[k];
            if (r.Kind == Kind.Text) continue;
            bool block = r.Kind == Kind.Statement;
            if (k > 0 && raw[k - 1].Kind == Kind.Text)
            {
                if (r.TrimLeft) texts[k - 1] = texts[k - 1].TrimEnd();
                else if (block && lstripBlocks && !r.KeepLeft)
                {
                    // Only the spaces and tabs between a line start and the tag, judged on the source text.
                    var original = raw[k - 1].Content;
                    int cut = original.Length;
                    while (cut > 0 && original[cut - 1] is ' ' or '\t') cut--;
                    bool atLineStart = cut == 0 ? raw[k - 1].Pos == 0 : original[cut - 1] == '\n';
                    if (atLineStart) texts[k - 1] = texts[k - 1].TrimEnd(' ', '\t');
                }
            }
            if (k + 1 < raw.Count && raw[k + 1].Kind == Kind.Text)
            {
                if (r.TrimRight) texts[k + 1] = texts[k + 1].TrimStart();
                else if (block && trimBlocks)
                {
                    var t = texts[k + 1];
                    if (t.StartsWith("\r\n", StringComparison.Ordinal)) texts[k + 1] = t[2..];
                    else if (t.StartsWith('\n')) texts[k + 1] = t[1..];
                }
            }
        }
        var result = new List<Segment>();
        for (int k = 0; k < raw.Count; k++)
        {
            if (raw[k].Kind == Kind.Statement && raw[k].Content == "#comment") continue;
            if (raw[k].Kind == Kind.Text && texts[k].Length == 0) continue;
            var (line, col) = Position(source, raw[k].Pos);
            result.Add(new Segment(raw[k].Kind, texts[k], line, col));
        }
        return result;
    }

    private static int FindClose(string s, int from, string close, bool comment)
    {
        if (comment) return s.IndexOf(close, from, StringComparison.Ordinal);
        char quote = '\0';
        for (int i = from; i + 1 < s.Length; i++)
        {
            char c = s[i];
            if (quote != '\0')
            {
                if (c == '\\') i++;
                else if (c == quote) quote = '\0';
                continue;
            }
            if (c is '\'' or '"') quote = c;
            else if (c == close[0] && s[i + 1] == close[1]) return i;
        }
        return -1;
    }

    public static (int Line, int Column) Position(string s, int pos)
    {
        int line = 1, col = 1;
        for (int i = 0; i < pos && i < s.Length; i++)
            if (s[i] == '\n') { line++; col = 1; } else col++;
        return (line, col);
    }

    public static JinjaException Error(string source, int pos, string message)
    {
        var (line, col) = Position(source, pos);
        return new JinjaException($"template line {line}, column {col}: {message}");
    }
}

/// <summary>Tokens of the expression language inside tags.</summary>
internal enum TokenType { Name, String, Integer, Float, Operator, End }

internal readonly record struct Token(TokenType Type, string Text, object? Value = null);

internal static class ExpressionLexer
{
    private static readonly string[] Operators =
        ["**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ".", ",", ":", "|"];

    public static List<Token> Tokenize(string s, Func<string, JinjaException> error)
    {
        var tokens = new List<Token>();
        int i = 0;
        while (i < s.Length)
        {
            char c = s[i];
            if (char.IsWhiteSpace(c)) { i++; continue; }
            if (char.IsLetter(c) || c == '_')
            {
                int start = i;
                while (i < s.Length && (char.IsLetterOrDigit(s[i]) || s[i] == '_')) i++;
                tokens.Add(new Token(TokenType.Name, s[start..i]));
                continue;
            }
            if (char.IsAsciiDigit(c))
            {
                // Python's literals: digits (with '_' between them), an optional fraction, an optional
                // exponent that has digits. Digits other than ASCII ones are not numbers.
                int start = i;
                while (i < s.Length && (char.IsAsciiDigit(s[i]) || s[i] == '_')) i++;
                bool isFloat = false;
                if (i + 1 < s.Length && s[i] == '.' && char.IsAsciiDigit(s[i + 1]))
                {
                    isFloat = true;
                    i++;
                    while (i < s.Length && char.IsAsciiDigit(s[i])) i++;
                }
                if (i < s.Length && s[i] is 'e' or 'E')
                {
                    isFloat = true;
                    i++;
                    if (i < s.Length && s[i] is '+' or '-') i++;
                    int digits = i;
                    while (i < s.Length && char.IsAsciiDigit(s[i])) i++;
                    if (i == digits) throw error($"malformed number '{s[start..i]}'");
                }
                var text = s[start..i].Replace("_", "");
                if (isFloat)
                    tokens.Add(new Token(TokenType.Float, text, double.Parse(text, System.Globalization.CultureInfo.InvariantCulture)));
                else if (long.TryParse(text, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var integer))
                    tokens.Add(new Token(TokenType.Integer, text, integer));
                else throw error($"integer '{(text.Length > 30 ? text[..30] + "..." : text)}' does not fit 64 bits");
                continue;
            }
            if (c is '\'' or '"')
            {
                var sb = new StringBuilder();
                int start = i++;
                while (true)
                {
                    if (i >= s.Length) throw error($"unterminated string starting at {s[start..Math.Min(s.Length, start + 20)]}");
                    char d = s[i++];
                    if (d == c) break;
                    if (d != '\\' || i >= s.Length) { sb.Append(d); continue; }
                    char e = s[i++];
                    sb.Append(e switch
                    {
                        'n' => "\n", 't' => "\t", 'r' => "\r", '\\' => "\\", '\'' => "'", '"' => "\"", '0' => "\0",
                        'u' when i + 4 <= s.Length => ((char)(int.TryParse(s.AsSpan((i += 4) - 4, 4), System.Globalization.NumberStyles.AllowHexSpecifier, System.Globalization.CultureInfo.InvariantCulture, out var code)
                            ? code : throw error($"invalid escape \\u{s.Substring(i - 4, 4)}"))).ToString(),
                        _ => "\\" + e,
                    });
                }
                tokens.Add(new Token(TokenType.String, sb.ToString(), sb.ToString()));
                continue;
            }
            var op = Operators.FirstOrDefault(o => string.CompareOrdinal(s, i, o, 0, o.Length) == 0)
                ?? throw error($"unexpected character '{c}'");
            tokens.Add(new Token(TokenType.Operator, op));
            i += op.Length;
        }
        tokens.Add(new Token(TokenType.End, ""));
        return tokens;
    }
}
