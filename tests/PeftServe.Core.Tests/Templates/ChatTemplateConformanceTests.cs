using System.Text.Json;
using PeftServe.Core.Templates;
using PeftServe.Core.Tokenization;
using PeftServe.Tests;

namespace PeftServe.Core.Tests.Templates;

/// <summary>Real chat templates (Llama 3, Qwen3 from npm; the tiny model's ChatML) rendered as
/// transformers' apply_chat_template renders them.</summary>
public class ChatTemplateConformanceTests
{
    private static readonly JsonElement Real = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestData.FixturesDir, "real-tokenizers-expected.json"))).RootElement;

    [Theory]
    [InlineData("llama3")]
    [InlineData("qwen3")]
    public void RealTemplatesRenderTheReferenceTextAndIds(string name)
    {
        var chat = Real.GetProperty(name).GetProperty("chat");
        var tokenizer = Tokenizer.FromDirectory(TestData.RealTokenizerDir(name));
        var messages = chat.GetProperty("messages").EnumerateArray()
            .Select(m => new ChatMessage(m.GetProperty("role").GetString()!, m.GetProperty("content").GetString()!)).ToList();
        var text = ChatTemplate.Render(tokenizer.ChatTemplate!, messages, addGenerationPrompt: true,
            new Dictionary<string, object?> { ["bos_token"] = tokenizer.BosToken, ["eos_token"] = tokenizer.EosToken });
        Assert.Equal(chat.GetProperty("text").GetString(), text);
        Assert.Equal(chat.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()), tokenizer.Encode(text, addSpecialTokens: false));
    }

    [Fact]
    public void TinyModelChatMlTemplateMatchesTheFixtureIds()
    {
        var tokenizer = Tokenizer.FromDirectory(TestData.TinyLlamaDir);
        var text = ChatTemplate.Render(tokenizer.ChatTemplate!, [new ChatMessage("user", "Hi")], addGenerationPrompt: true);
        Assert.Equal("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", text);
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(TestData.FixturesDir, "tiny-llama-tokenizer-expected.json")));
        Assert.Equal(doc.RootElement.GetProperty("chat").EnumerateArray().Select(x => x.GetInt32()), tokenizer.Encode(text, addSpecialTokens: false));
    }

    [Fact]
    public void Qwen3TemplateHandlesThinkingAndTools()
    {
        var template = Tokenizer.FromDirectory(TestData.RealTokenizerDir("qwen3")).ChatTemplate!;
        var text = ChatTemplate.Render(template, [new ChatMessage("user", "2+2?"), new ChatMessage("assistant", "<think>\nadd\n</think>\n\n4")], false);
        Assert.Equal("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n", text);
        var tools = new List<object?> { new Dictionary<string, object?> { ["name"] = "f", ["parameters"] = new Dictionary<string, object?> { ["x"] = 1L } } };
        var withTools = ChatTemplate.Render(template, [new ChatMessage("user", "hi")], true, new Dictionary<string, object?> { ["tools"] = tools });
        Assert.Contains("<tools>\n{\"name\": \"f\", \"parameters\": {\"x\": 1}}\n</tools>", withTools);
        Assert.EndsWith("<|im_start|>assistant\n", withTools);
    }
}

public class JinjaTemplateTests
{
    private static string R(string source, object? context = null) =>
        JinjaTemplate.Parse(source).Render(context is null ? new Dictionary<string, object?>() :
            (IReadOnlyDictionary<string, object?>)System.Text.Json.JsonSerializer.Deserialize<Dictionary<string, JsonElement>>(System.Text.Json.JsonSerializer.Serialize(context))!
                .ToDictionary(kv => kv.Key, kv => (object?)kv.Value));

    [Theory]
    [InlineData("{{ 1 + 2 * 3 }}", "7")]
    [InlineData("{{ 7 // 2 }} {{ 7 % 3 }} {{ 2 ** 3 }} {{ 7 / 2 }}", "3 1 8 3.5")]
    [InlineData("{{ 'a' ~ 1 ~ true }}", "a1True")]
    [InlineData("{{ none }} {{ [1, 'x'] }} {{ {'k': 2} }}", "None [1, 'x'] {'k': 2}")]
    [InlineData("{{ 'abc'[::-1] }} {{ [1,2,3,4][1:3] }} {{ 'hello'[-1] }}", "cba [2, 3] o")]
    [InlineData("{{ 3 if false else 4 }} {{ 'y' if 1 }}", "4 y")]
    [InlineData("{{ not 1 in [1, 2] }} {{ 3 not in [1] }}", "False True")]
    [InlineData("{{ '  x  ' | trim }}|{{ 'AbC' | lower }}|{{ 'ab' | upper }}|{{ [3,1,2] | sort | join(',') }}", "x|abc|AB|1,2,3")]
    [InlineData("{{ [1,2,3] | length }} {{ 'abc' | length }} {{ [1,2] | first }} {{ [1,2] | last }}", "3 3 1 2")]
    [InlineData("{{ missing | default('d') }} {{ '' | default('e', true) }}", "d e")]
    [InlineData("{{ 'a,b,,c'.split(',') }} {{ '  pad '.strip() }} {{ 'xxhixx'.strip('x') }}", "['a', 'b', '', 'c'] pad hi")]
    [InlineData("{{ 'Hello'.startswith('He') }} {{ 'Hello'.endswith('x') }} {{ 'a-b'.replace('-', '+') }}", "True False a+b")]
    [InlineData("{{ {'a': 1, 'b': [true, none, 'é']} | tojson }}", "{\"a\": 1, \"b\": [true, null, \"é\"]}")]
    [InlineData("{{ {'a': 1} | tojson(indent=2) }}", "{\n  \"a\": 1\n}")]
    [InlineData("{% for x in range(3) %}{{ loop.index }}{{ ',' if not loop.last }}{% endfor %}", "1,2,3")]
    [InlineData("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}", "a=1;b=2;")]
    [InlineData("{% for x in [1,2,3,4] if x is even %}{{ x }}{% else %}none{% endfor %}", "24")]
    [InlineData("{% for x in [] %}{{ x }}{% else %}empty{% endfor %}", "empty")]
    [InlineData("{% for x in [1,2,3] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 3 %}{% break %}{% endif %}{{ x }}{% endfor %}", "1")]
    [InlineData("{% set ns = namespace(n=0) %}{% for x in [1,2,3] %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}", "6")]
    [InlineData("{% set n = 1 %}{% for x in [1] %}{% set n = 5 %}{% endfor %}{{ n }}", "1")]
    [InlineData("{% set block %}in{{ 1 }}{% endset %}[{{ block }}]", "[in1]")]
    [InlineData("{% macro greet(name, p='Hi') %}{{ p }} {{ name }}{% endmacro %}{{ greet('A') }}/{{ greet('B', p='Yo') }}", "Hi A/Yo B")]
    [InlineData("{% if x is defined %}d{% elif y is none %}n{% else %}e{% endif %}", "e")]
    [InlineData("{{ [{'r':'a'},{'r':'b'}] | selectattr('r', 'equalto', 'b') | map(attribute='r') | list }}", "['b']")]
    [InlineData("{# comment #}ok{{ '{{' }}", "ok{{")]
    public void ExpressionsAndStatements(string template, string expected) => Assert.Equal(expected, R(template));

    [Fact]
    public void WhitespaceControlAndTrimLstripBlocks()
    {
        Assert.Equal("a\nb\n", R("{% for x in ['a','b'] %}\n    {{ x }}\n{% endfor %}".Replace("    {{", "{{")));
        Assert.Equal("ab", R("{%- for x in ['a','b'] -%}\n  {{ x }}\n{%- endfor %}"));
        Assert.Equal("  x\n", R("{% if true %}\n  x\n  {% endif %}\n"));
        Assert.Equal("x", R("  {% if true %}x{% endif %}"));
    }

    [Fact]
    public void MessagesFromJsonAndLoopVariables()
    {
        var text = R("{% for m in messages %}{{ loop.index0 }}:{{ m.role }}={{ m['content'] }}{% if not loop.last %}|{% endif %}{% endfor %}",
            new { messages = new[] { new { role = "user", content = "hi" }, new { role = "assistant", content = "yo" } } });
        Assert.Equal("0:user=hi|1:assistant=yo", text);
    }

    [Fact]
    public void RaiseExceptionCarriesTheTemplatesMessage()
    {
        var e = Assert.Throws<JinjaException>(() => R("{% if true %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"));
        Assert.Equal("Conversation roles must alternate", e.Message);
    }

    [Theory]
    [InlineData("{% if x %}unclosed", "endif")]
    [InlineData("line1\n{{ 1 + }}", "line 2")]
    [InlineData("{% frobnicate %}", "unknown statement 'frobnicate'")]
    [InlineData("{{ x | nosuchfilter }}", "unknown filter 'nosuchfilter'")]
    [InlineData("{{ 'abc", "unclosed")]
    public void ErrorsSayWhereAndWhat(string template, string expected) =>
        Assert.Contains(expected, Assert.Throws<JinjaException>(() => R(template)).Message);
}
