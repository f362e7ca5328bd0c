using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Server.Adapters;
using PeftServe.Server.Api;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>One adapter store shared by replicas (a PVC or NFS volume): stores on one folder behave as
/// one, whichever replica writes.</summary>
public sealed class SharedStoreTests
{
    private static string Example(string name) => Path.Combine(TestData.RepoRoot, "adapters", name);

    private static List<(string, Stream, long)> Files(string dir) =>
        Directory.GetFiles(dir).Select(f => (Path.GetFileName(f), (Stream)new MemoryStream(File.ReadAllBytes(f)), new FileInfo(f).Length)).ToList();

    /// <summary>Two replicas are two AdapterStore objects (no lock in common) on one folder; each
    /// round both store one name at the same moment: one wins, the other gets a 409, never a 500.</summary>
    [Fact]
    public async Task TwoReplicasStoringOneNameAtOnceGiveOneSuccessAndOneConflict()
    {
        var dir = Directory.CreateTempSubdirectory("peftserve-shared-").FullName;
        try
        {
            var config = ModelConfig.Load(TestData.TinyLlamaDir);
            AdapterStore Replica() => new(dir, config, new AdapterLimits(), new UploadLimits());
            var replicas = new[] { Replica(), Replica() };
            for (int round = 0; round < 150; round++)
            {
                var name = $"race-{round}";
                using var start = new Barrier(2);
                var outcomes = replicas.Select(store => Task.Run(() =>
                {
                    var files = Files(Example(round % 2 == 0 ? "tiny-lora-r4-qv" : "tiny-ia3"));
                    start.SignalAndWait();
                    try { store.Save(name, files); return "201"; }
                    catch (ApiException e) { return e.Status.ToString(System.Globalization.CultureInfo.InvariantCulture); }
                    catch (Exception e) { return e.GetType().Name + ": " + e.Message; }
                })).ToArray();
                var results = (await Task.WhenAll(outcomes)).Order().ToArray();
                Assert.True(results is ["201", "409"], $"round {round}: {string.Join(" / ", results)}");
                Assert.True(File.Exists(Path.Combine(dir, name, AdapterFolder.ConfigFile)));
            }
            Assert.DoesNotContain(Directory.GetDirectories(dir), d => Path.GetFileName(d).StartsWith('.'));
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>Two replicas deleting one adapter at once: one deletes it, the other finds nothing (404), never a 500.</summary>
    [Fact]
    public async Task TwoReplicasDeletingOneNameAtOnceGiveOneDeleteAndOneNotFound()
    {
        var dir = Directory.CreateTempSubdirectory("peftserve-shared-").FullName;
        try
        {
            var config = ModelConfig.Load(TestData.TinyLlamaDir);
            var replicas = new[] { new AdapterStore(dir, config, new AdapterLimits(), new UploadLimits()), new AdapterStore(dir, config, new AdapterLimits(), new UploadLimits()) };
            for (int round = 0; round < 100; round++)
            {
                var name = $"gone-{round}";
                TestServer.CopyDir(Example("tiny-ia3"), Path.Combine(dir, name));
                using var start = new Barrier(2);
                var outcomes = replicas.Select(store => Task.Run(() =>
                {
                    start.SignalAndWait();
                    try { return store.Delete(name) ? "deleted" : "absent"; }
                    catch (Exception e) { return e.GetType().Name + ": " + e.Message; }
                })).ToArray();
                var results = (await Task.WhenAll(outcomes)).Order().ToArray();
                Assert.True(results is ["absent", "deleted"], $"round {round}: {string.Join(" / ", results)}");
            }
        }
        finally { Directory.Delete(dir, true); }
    }
}
