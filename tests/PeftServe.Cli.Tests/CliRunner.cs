using System.Diagnostics;

namespace PeftServe.Cli.Tests;

/// <summary>Runs the real CLI as a child process (the contract other tools rely on: arguments in,
/// stdout, stderr and an exit code out).</summary>
internal static class CliRunner
{
    private static readonly string CliDll = Path.Combine(AppContext.BaseDirectory, "PeftServe.Cli.dll");

    public static (int ExitCode, string StdOut, string StdErr) Run(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(CliDll);
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        if (!p.WaitForExit(TimeSpan.FromMinutes(2))) { p.Kill(true); throw new TimeoutException("CLI did not exit"); }
        return (p.ExitCode, stdout, stderr.Result);
    }
}
