namespace PeftServe.Trainer;

/// <summary>The loss curve as a PNG: training loss per step and validation loss where measured.</summary>
public static class LossPlot
{
    public static void Write(string path, IReadOnlyList<StepInfo> history, IReadOnlyList<EvalInfo> evaluations, string title)
    {
        var plot = new ScottPlot.Plot();
        if (history.Count > 0)
        {
            var train = plot.Add.Scatter(history.Select(h => (double)h.Step).ToArray(), history.Select(h => h.Loss).ToArray());
            train.LegendText = "training loss";
            train.MarkerSize = history.Count > 50 ? 0 : 4;
        }
        var evals = evaluations.Where(e => double.IsFinite(e.Loss)).ToArray();
        if (evals.Length > 0)
        {
            var val = plot.Add.Scatter(evals.Select(e => (double)e.Step).ToArray(), evals.Select(e => e.Loss).ToArray());
            val.LegendText = "validation loss";
            val.MarkerSize = 6;
        }
        plot.Title(title);
        plot.XLabel("step");
        plot.YLabel("loss (nats/token)");
        plot.ShowLegend();
        plot.SavePng(path, 800, 500);
    }
}
