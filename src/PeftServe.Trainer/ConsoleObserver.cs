using System.Globalization;
using Spectre.Console;

namespace PeftServe.Trainer;

/// <summary>Plain structured lines on stderr (key=value), for logs and redirected output.</summary>
public sealed class LineObserver(TextWriter writer, int every) : ITrainingObserver
{
    private static string F(double x) => x.ToString("G5", CultureInfo.InvariantCulture);

    public void OnStart(TrainingRun run, int firstStep) => Describe(run, firstStep).ForEach(writer.WriteLine);

    public void OnStep(StepInfo s)
    {
        if (s.Step % Math.Max(1, every) == 0 || s.Step == s.MaxSteps || s.Step == 1)
            writer.WriteLine($"step={s.Step}/{s.MaxSteps} loss={F(s.Loss)} lr={F(s.LearningRate)} grad_norm={F(s.GradNorm)} tokens_per_s={s.TokensPerSecond:F0} memory_mib={s.MemoryBytes / 1048576.0:F0}");
    }

    public void OnEval(EvalInfo e) => writer.WriteLine($"eval step={e.Step} val_loss={F(e.Loss)} val_ppl={F(e.Perplexity)}");
    public void OnMessage(string message) => writer.WriteLine(message);

    /// <summary>The opening lines: method, model, data, and the trainable parameter count and share.</summary>
    public static List<string> Describe(TrainingRun run, int firstStep)
    {
        var (p, total, pct) = run.ParameterShare;
        return
        [
            $"method={run.Method.Name} model={run.ModelDir}{(run.Options.RandomWeights ? " (random weights)" : "")} device={run.Model.Device} dtype={run.Model.DType} base={run.Model.DecoderLinearFormat}" +
                (run.Options.GradientCheckpointing ? " gradient_checkpointing=on" : ""),
            $"train_examples={run.TrainSet.Count} validation_examples={run.ValidationSet.Count} batch={run.Options.BatchSize}x{run.Options.GradientAccumulation} lr={F(run.Schedule.Peak)} schedule={run.Schedule.Kind} warmup={run.Schedule.WarmupSteps}",
            $"trainable parameters: {p:N0} of {total:N0} ({pct.ToString("F4", CultureInfo.InvariantCulture)}% of the model)",
            firstStep > 1 ? $"continuing at step {firstStep}" : "starting at step 1",
        ];
    }
}

/// <summary>A live Spectre.Console progress bar with step, loss, learning rate, tokens/s and the memory
/// in use (the device's on CUDA, the process's on CPU); evaluation results and messages are printed above it.</summary>
public static class ProgressBarTraining
{
    public static void Run(TrainingRun run)
    {
        AnsiConsole.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("training", maxValue: run.Options.MaxSteps);
                run.Train(new Observer(task));
            });
    }

    private sealed class Observer(ProgressTask task) : ITrainingObserver
    {
        public void OnStart(TrainingRun run, int firstStep)
        {
            foreach (var line in LineObserver.Describe(run, firstStep)) AnsiConsole.MarkupLine(Markup.Escape(line));
            task.Value = firstStep - 1;
        }

        public void OnStep(StepInfo s)
        {
            task.Value = s.Step;
            task.Description = Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                $"step {s.Step}/{s.MaxSteps}  loss {s.Loss:F4}  lr {s.LearningRate:E2}  {s.TokensPerSecond:N0} tok/s  mem {s.MemoryBytes / 1073741824.0:F2} GiB"));
        }

        public void OnEval(EvalInfo e) =>
            AnsiConsole.MarkupLine(Markup.Escape(string.Create(CultureInfo.InvariantCulture, $"step {e.Step}: validation loss {e.Loss:F4}, perplexity {e.Perplexity:F2}")));

        public void OnMessage(string message) => AnsiConsole.MarkupLine(Markup.Escape(message));
    }
}
