using BenchmarkDotNet.Running;

// dotnet run -c Release --project loadtests/PeftServe.Benchmarks -- --filter '*'
BenchmarkSwitcher.FromAssembly(typeof(PeftServe.Benchmarks.DecodeStepBenchmarks).Assembly).Run(args);
