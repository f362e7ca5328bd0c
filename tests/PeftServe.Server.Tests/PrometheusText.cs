using System.Globalization;
using System.Text;

namespace PeftServe.Server.Tests;

/// <summary>One sample of Prometheus' text format: name, labels, value.</summary>
public sealed record PrometheusSample(string Name, IReadOnlyDictionary<string, string> Labels, double Value)
{
    /// <summary>A label's value split on commas (as the gateway reads running_lora_adapters), blanks dropped.</summary>
    public string[] List(string label) =>
        Labels.TryGetValue(label, out var v) ? v.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : [];
}

/// <summary>Reads the text format as a scraper does (label values with escaped quotes, backslashes and newlines).</summary>
public static class PrometheusText
{
    public static List<PrometheusSample> Parse(string text)
    {
        var samples = new List<PrometheusSample>();
        foreach (var raw in text.Split('\n'))
        {
            var line = raw.Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            int brace = line.IndexOf('{'), space = line.IndexOf(' ');
            var labels = new Dictionary<string, string>(StringComparer.Ordinal);
            string name;
            int rest;
            if (brace >= 0 && brace < space)
            {
                name = line[..brace];
                int i = brace + 1;
                while (line[i] != '}')
                {
                    int eq = line.IndexOf('=', i);
                    var key = line[i..eq].Trim(',', ' ');
                    var value = new StringBuilder();
                    int j = eq + 2;   // after ="
                    for (; line[j] != '"'; j++)
                    {
                        if (line[j] == '\\') { j++; value.Append(line[j] == 'n' ? '\n' : line[j]); }
                        else value.Append(line[j]);
                    }
                    labels[key] = value.ToString();
                    i = j + 1;
                    if (line[i] == ',') i++;
                }
                rest = i + 1;
            }
            else { name = line[..space]; rest = space; }
            var valueText = line[rest..].Trim().Split(' ')[0];
            samples.Add(new PrometheusSample(name, labels, double.Parse(valueText, CultureInfo.InvariantCulture)));
        }
        return samples;
    }

    public static async Task<List<PrometheusSample>> ScrapeAsync(HttpClient http, string url = "metrics") => Parse(await http.GetStringAsync(url));
}
