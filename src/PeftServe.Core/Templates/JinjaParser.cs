namespace PeftServe.Core.Templates;

// ---- the syntax tree ----

internal abstract record Expr;
internal sealed record Literal(object? Value) : Expr;
internal sealed record Name(string Id) : Expr;
internal sealed record ListExpr(List<Expr> Items) : Expr;
internal sealed record TupleExpr(List<Expr> Items) : Expr;
internal sealed record DictExpr(List<(Expr Key, Expr Value)> Items) : Expr;
internal sealed record Attribute(Expr Target, string Attr) : Expr;
internal sealed record Subscript(Expr Target, Expr Index) : Expr;
internal sealed record Slice(Expr? Start, Expr? Stop, Expr? Step) : Expr;
internal sealed record Call(Expr Function, List<Expr> Args, List<(string Name, Expr Value)> Kwargs) : Expr;
internal sealed record Filter(Expr Target, string FilterName, List<Expr> Args, List<(string Name, Expr Value)> Kwargs) : Expr;
internal sealed record Test(Expr Target, string TestName, List<Expr> Args, bool Negated) : Expr;
internal sealed record Unary(string Op, Expr Operand) : Expr;
internal sealed record Binary(string Op, Expr Left, Expr Right) : Expr;
internal sealed record Conditional(Expr Condition, Expr Then, Expr? Else) : Expr;

internal abstract record Node;
internal sealed record TextNode(string Text) : Node;
internal sealed record OutputNode(Expr Expr) : Node;
internal sealed record IfNode(List<(Expr Condition, List<Node> Body)> Branches, List<Node>? Else) : Node;
internal sealed record ForNode(List<string> Targets, Expr Iterable, Expr? Filter, List<Node> Body, List<Node>? Else) : Node;
internal sealed record SetNode(Expr Target, Expr? Value, List<Node>? Body) : Node;
internal sealed record MacroNode(string MacroName, List<(string Name, Expr? Default)> Parameters, List<Node> Body) : Node;
internal sealed record BreakNode : Node;
internal sealed record ContinueNode : Node;

/// <summary>Parses the tag stream into a tree: statements by recursive descent over the segments,
/// expressions by precedence climbing in Jinja's order (ternary, or, and, not, comparisons and tests,
/// ~, + -, * / // %, **, unary, then postfix: attributes, subscripts, calls and filters).</summary>
internal sealed class Parser
{
    private readonly List<TemplateLexer.Segment> _segments;
    private int _pos;

    public Parser(List<TemplateLexer.Segment> segments) => _segments = segments;

    public List<Node> ParseTemplate()
    {
        var body = ParseBody(out var end);
        if (end is not null) throw Error(_segments[_pos], $"unexpected '{{% {end} %}}'");   // ParseBody stops on that segment
        return body;
    }

    /// <summary>Nodes until a statement whose keyword ends the current block (returned in <paramref name="endKeyword"/>).</summary>
    private List<Node> ParseBody(out string? endKeyword, params string[] enders)
    {
        TemplateLimits.EnsureStack();
        var nodes = new List<Node>();
        while (_pos < _segments.Count)
        {
            var seg = _segments[_pos++];
            switch (seg.Kind)
            {
                case TemplateLexer.Kind.Text: nodes.Add(new TextNode(seg.Content)); break;
                case TemplateLexer.Kind.Expression: nodes.Add(new OutputNode(new ExprParser(seg).ParseAll())); break;
                default:
                    var p = new ExprParser(seg);
                    var keyword = p.PeekName();
                    if (keyword is not null && (enders.Contains(keyword) || keyword.StartsWith("end", StringComparison.Ordinal) && enders.Length == 0))
                    {
                        endKeyword = keyword;
                        _pos--;
                        return nodes;
                    }
                    if (keyword is not null && enders.Contains(keyword)) { endKeyword = keyword; _pos--; return nodes; }
                    nodes.Add(ParseStatement(seg, p));
                    break;
            }
        }
        endKeyword = null;
        if (enders.Length > 0) throw new JinjaException($"template ended before {{% {string.Join(" / ", enders)} %}}");
        return nodes;
    }

    private Node ParseStatement(TemplateLexer.Segment seg, ExprParser p)
    {
        var keyword = p.ExpectName();
        switch (keyword)
        {
            case "if":
            {
                var branches = new List<(Expr, List<Node>)>();
                var condition = p.ParseAll();
                List<Node>? elseBody = null;
                while (true)
                {
                    var body = ParseBody(out var end, "elif", "else", "endif");
                    branches.Add((condition, body));
                    var tag = _segments[_pos++];
                    var tp = new ExprParser(tag);
                    tp.ExpectName();
                    if (end == "elif") { condition = tp.ParseAll(); continue; }
                    if (end == "else") { elseBody = ParseBody(out _, "endif"); _pos++; }
                    break;
                }
                return new IfNode(branches, elseBody);
            }
            case "for":
            {
                var targets = new List<string> { p.ExpectName() };
                while (p.TryOperator(",")) targets.Add(p.ExpectName());
                p.ExpectKeyword("in");
                var iterable = p.ParseNoTernary();
                Expr? filter = p.TryKeyword("if") ? p.ParseNoTernary() : null;
                p.TryKeyword("recursive");
                p.ExpectEnd();
                var body = ParseBody(out var end, "else", "endfor");
                List<Node>? elseBody = null;
                _pos++;
                if (end == "else") { elseBody = ParseBody(out _, "endfor"); _pos++; }
                return new ForNode(targets, iterable, filter, body, elseBody);
            }
            case "set":
            {
                var target = p.ParseTarget();
                if (p.TryOperator("="))
                {
                    var value = p.ParseAll();
                    return new SetNode(target, value, null);
                }
                p.ExpectEnd();
                var body = ParseBody(out _, "endset");
                _pos++;
                return new SetNode(target, null, body);
            }
            case "macro":
            {
                var macroName = p.ExpectName();
                var parameters = new List<(string, Expr?)>();
                p.ExpectOperator("(");
                while (!p.TryOperator(")"))
                {
                    var param = p.ExpectName();
                    parameters.Add((param, p.TryOperator("=") ? p.ParseNoTernary() : null));
                    p.TryOperator(",");
                }
                p.ExpectEnd();
                var body = ParseBody(out _, "endmacro");
                _pos++;
                return new MacroNode(macroName, parameters, body);
            }
            case "break": p.ExpectEnd(); return new BreakNode();
            case "continue": p.ExpectEnd(); return new ContinueNode();
            case "generation" or "filter" or "call":
            {
                // transformers' {% generation %} marks assistant text for masks; it renders its body as is.
                var end = "end" + keyword;
                var body = ParseBody(out _, end);
                _pos++;
                return new IfNode([(new Literal(true), body)], null);
            }
            default:
                throw Error(seg, $"unknown statement '{keyword}'");
        }
    }

    internal static JinjaException Error(TemplateLexer.Segment seg, string message) =>
        new($"template line {seg.Line}, column {seg.Column}: {message}");
}

/// <summary>Recursive-descent parser for the expression inside one tag.</summary>
internal sealed class ExprParser
{
    private readonly List<Token> _tokens;
    private readonly TemplateLexer.Segment _seg;
    private int _i;

    public ExprParser(TemplateLexer.Segment seg)
    {
        _seg = seg;
        _tokens = ExpressionLexer.Tokenize(seg.Content, m => Parser.Error(seg, m));
    }

    private Token Peek => _tokens[_i];
    private JinjaException Error(string m) => Parser.Error(_seg, m);

    public string? PeekName() => Peek.Type == TokenType.Name ? Peek.Text : null;
    public string ExpectName() => Peek.Type == TokenType.Name ? _tokens[_i++].Text : throw Error($"expected a name, found '{Peek.Text}'");
    public bool TryOperator(string op) { if (Peek.Type == TokenType.Operator && Peek.Text == op) { _i++; return true; } return false; }
    public void ExpectOperator(string op) { if (!TryOperator(op)) throw Error($"expected '{op}', found '{Peek.Text}'"); }
    public bool TryKeyword(string k) { if (Peek.Type == TokenType.Name && Peek.Text == k) { _i++; return true; } return false; }
    public void ExpectKeyword(string k) { if (!TryKeyword(k)) throw Error($"expected '{k}', found '{Peek.Text}'"); }
    public void ExpectEnd() { if (Peek.Type != TokenType.End) throw Error($"unexpected '{Peek.Text}'"); }

    public Expr ParseAll()
    {
        var e = ParseTuple();
        ExpectEnd();
        return e;
    }

    /// <summary>A set target: a name, ns.attr, or a tuple of names.</summary>
    public Expr ParseTarget()
    {
        Expr target = new Name(ExpectName());
        if (TryOperator(".")) return new Attribute(target, ExpectName());
        if (Peek.Type == TokenType.Operator && Peek.Text == ",")
        {
            var items = new List<Expr> { target };
            while (TryOperator(",")) items.Add(new Name(ExpectName()));
            return new TupleExpr(items);
        }
        return target;
    }

    private Expr ParseTuple()
    {
        var first = ParseExpr();
        if (!(Peek.Type == TokenType.Operator && Peek.Text == ",")) return first;
        var items = new List<Expr> { first };
        while (TryOperator(","))
        {
            if (Peek.Type == TokenType.End) break;
            items.Add(ParseExpr());
        }
        return new TupleExpr(items);
    }

    public Expr ParseExpr()
    {
        TemplateLimits.EnsureStack();
        var e = ParseOr();
        if (TryKeyword("if"))
        {
            var condition = ParseOr();
            Expr? otherwise = TryKeyword("else") ? ParseExpr() : null;
            return new Conditional(condition, e, otherwise);
        }
        return e;
    }

    public Expr ParseNoTernary() => ParseOr();

    private Expr ParseOr()
    {
        var e = ParseAnd();
        while (TryKeyword("or")) e = new Binary("or", e, ParseAnd());
        return e;
    }

    private Expr ParseAnd()
    {
        var e = ParseNot();
        while (TryKeyword("and")) e = new Binary("and", e, ParseNot());
        return e;
    }

    private Expr ParseNot() => TemplateLimits.EnsureStack() && TryKeyword("not") ? new Unary("not", ParseNot()) : ParseComparison();

    private Expr ParseComparison()
    {
        var e = ParseConcat();
        while (true)
        {
            if (Peek.Type == TokenType.Operator && Peek.Text is "==" or "!=" or "<" or ">" or "<=" or ">=")
            {
                var op = _tokens[_i++].Text;
                e = new Binary(op, e, ParseConcat());
            }
            else if (TryKeyword("in")) e = new Binary("in", e, ParseConcat());
            else if (Peek.Type == TokenType.Name && Peek.Text == "not" && _tokens[_i + 1].Type == TokenType.Name && _tokens[_i + 1].Text == "in")
            {
                _i += 2;
                e = new Unary("not", new Binary("in", e, ParseConcat()));
            }
            else if (TryKeyword("is"))
            {
                bool negated = TryKeyword("not");
                var test = ExpectName();
                var args = new List<Expr>();
                if (TryOperator("("))
                {
                    while (!TryOperator(")")) { args.Add(ParseExpr()); TryOperator(","); }
                }
                else if (Peek.Type is TokenType.String or TokenType.Integer or TokenType.Float ||
                         Peek.Type == TokenType.Name && Peek.Text is not ("and" or "or" or "else" or "if" or "not" or "in" or "is"))
                    args.Add(ParsePrimaryWithPostfix());
                e = new Test(e, test, args, negated);
            }
            else return e;
        }
    }

    private Expr ParseConcat()
    {
        var e = ParseAdd();
        while (TryOperator("~")) e = new Binary("~", e, ParseAdd());
        return e;
    }

    private Expr ParseAdd()
    {
        var e = ParseMul();
        while (Peek.Type == TokenType.Operator && Peek.Text is "+" or "-")
        {
            var op = _tokens[_i++].Text;
            e = new Binary(op, e, ParseMul());
        }
        return e;
    }

    private Expr ParseMul()
    {
        var e = ParsePow();
        while (Peek.Type == TokenType.Operator && Peek.Text is "*" or "/" or "//" or "%")
        {
            var op = _tokens[_i++].Text;
            e = new Binary(op, e, ParsePow());
        }
        return e;
    }

    private Expr ParsePow()
    {
        var e = ParseUnary();
        while (TryOperator("**")) e = new Binary("**", e, ParseUnary());
        return e;
    }

    private Expr ParseUnary()
    {
        TemplateLimits.EnsureStack();
        if (TryOperator("-")) return new Unary("-", ParseUnary());
        if (TryOperator("+")) return ParseUnary();
        return ParsePrimaryWithPostfix();
    }

    private Expr ParsePrimaryWithPostfix()
    {
        var e = ParsePrimary();
        while (true)
        {
            if (TryOperator(".")) e = new Attribute(e, Peek.Type == TokenType.Integer ? _tokens[_i++].Text : ExpectName());
            else if (TryOperator("[")) { e = new Subscript(e, ParseSubscript()); ExpectOperator("]"); }
            else if (TryOperator("("))
            {
                var (args, kwargs) = ParseArguments();
                e = new Call(e, args, kwargs);
            }
            else if (TryOperator("|"))
            {
                var name = ExpectName();
                List<Expr> args = [];
                List<(string, Expr)> kwargs = [];
                if (TryOperator("(")) (args, kwargs) = ParseArguments();
                e = new Filter(e, name, args, kwargs);
            }
            else return e;
        }
    }

    private (List<Expr>, List<(string, Expr)>) ParseArguments()
    {
        var args = new List<Expr>();
        var kwargs = new List<(string, Expr)>();
        while (!TryOperator(")"))
        {
            if (Peek.Type == TokenType.Name && _tokens[_i + 1].Type == TokenType.Operator && _tokens[_i + 1].Text == "=")
            {
                var name = ExpectName();
                _i++;
                kwargs.Add((name, ParseExpr()));
            }
            else args.Add(ParseExpr());
            if (!TryOperator(",") && !(Peek.Type == TokenType.Operator && Peek.Text == ")")) throw Error($"expected ',' or ')', found '{Peek.Text}'");
        }
        return (args, kwargs);
    }

    private Expr ParseSubscript()
    {
        Expr? start = null, stop = null, step = null;
        if (!(Peek.Type == TokenType.Operator && Peek.Text == ":")) start = ParseExpr();
        if (!TryOperator(":")) return start ?? throw Error("empty subscript");
        if (!(Peek.Type == TokenType.Operator && Peek.Text is ":" or "]")) stop = ParseExpr();
        if (TryOperator(":") && !(Peek.Type == TokenType.Operator && Peek.Text == "]")) step = ParseExpr();
        return new Slice(start, stop, step);
    }

    private Expr ParsePrimary()
    {
        var t = _tokens[_i++];
        switch (t.Type)
        {
            case TokenType.String:
                var s = (string)t.Value!;
                while (Peek.Type == TokenType.String) s += (string)_tokens[_i++].Value!;   // adjacent literals concatenate
                return new Literal(s);
            case TokenType.Integer or TokenType.Float: return new Literal(t.Value);
            case TokenType.Name:
                return t.Text switch
                {
                    "true" or "True" => new Literal(true),
                    "false" or "False" => new Literal(false),
                    "none" or "None" => new Literal(null),
                    _ => new Name(t.Text),
                };
            case TokenType.Operator when t.Text == "(":
            {
                if (TryOperator(")")) return new TupleExpr([]);
                var e = ParseExpr();
                if (TryOperator(")")) return e;
                var items = new List<Expr> { e };
                while (TryOperator(",")) { if (TryOperator(")")) return new TupleExpr(items); items.Add(ParseExpr()); }
                ExpectOperator(")");
                return new TupleExpr(items);
            }
            case TokenType.Operator when t.Text == "[":
            {
                var items = new List<Expr>();
                while (!TryOperator("]")) { items.Add(ParseExpr()); if (!TryOperator(",")) { ExpectOperator("]"); break; } }
                return new ListExpr(items);
            }
            case TokenType.Operator when t.Text == "{":
            {
                var items = new List<(Expr, Expr)>();
                while (!TryOperator("}"))
                {
                    var key = ParseExpr();
                    ExpectOperator(":");
                    items.Add((key, ParseExpr()));
                    if (!TryOperator(",")) { ExpectOperator("}"); break; }
                }
                return new DictExpr(items);
            }
            default:
                throw Error($"unexpected '{t.Text}'");
        }
    }
}
