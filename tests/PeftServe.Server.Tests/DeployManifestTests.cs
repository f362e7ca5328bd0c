using PeftServe.Tests;
using YamlDotNet.RepresentationModel;

namespace PeftServe.Server.Tests;

/// <summary>deploy/kubernetes agrees with itself and with the server (no cluster here to apply it to):
/// the Deployment passes only real server switches, the pool selects its pods, the picker serves that
/// pool, the route's backends exist, and kustomize lists every manifest.</summary>
public sealed class DeployManifestTests
{
    private static readonly string Dir = Path.Combine(TestData.RepoRoot, "deploy", "kubernetes");

    private static List<YamlMappingNode> Documents(string file)
    {
        var yaml = new YamlStream();
        using (var reader = new StreamReader(Path.Combine(Dir, file))) yaml.Load(reader);
        return yaml.Documents.Select(d => d.RootNode).OfType<YamlMappingNode>().ToList();
    }

    private static YamlMappingNode Kind(string file, string kind, string? name = null) =>
        Documents(file).Single(d => S(d, "kind") == kind && (name is null || S(d, "metadata", "name") == name));

    private static YamlNode N(YamlNode node, params string[] path)
    {
        foreach (var key in path) node = ((YamlMappingNode)node).Children[new YamlScalarNode(key)];
        return node;
    }

    private static string S(YamlNode node, params string[] path) => ((YamlScalarNode)N(node, path)).Value!;

    private static Dictionary<string, string> Map(YamlNode node) =>
        ((YamlMappingNode)node).Children.ToDictionary(kv => ((YamlScalarNode)kv.Key).Value!, kv => ((YamlScalarNode)kv.Value).Value!);

    [Fact]
    public void TheDeploymentPassesOnlyRealServerSwitchesAndThePoolSelectsItsPods()
    {
        var deployment = Kind("peftserve.yaml", "Deployment", "peftserve");
        var container = (YamlMappingNode)((YamlSequenceNode)N(deployment, "spec", "template", "spec", "containers"))[0];
        var args = ((YamlSequenceNode)N(container, "args")).Select(a => ((YamlScalarNode)a).Value!).ToList();
        Assert.NotEmpty(args);
        foreach (var arg in args)
        {
            var flag = arg.Split('=')[0];
            Assert.True(Program.SwitchMappings.ContainsKey(flag), $"{flag} is not a server switch");
        }
        Assert.Contains(args, a => a.StartsWith("--redis=", StringComparison.Ordinal));
        var redis = args.Single(a => a.StartsWith("--redis=", StringComparison.Ordinal))["--redis=".Length..].Split(':')[0];
        Assert.Equal(redis, S(Kind("redis.yaml", "Service"), "metadata", "name"));
        foreach (var probe in new[] { "startupProbe", "readinessProbe", "livenessProbe" })
            Assert.Equal("/health", S(container, probe, "httpGet", "path"));

        var podLabels = Map(N(deployment, "spec", "template", "metadata", "labels"));
        Assert.Equal("vllm", podLabels["inference.networking.k8s.io/engine-type"]);
        var pool = Kind("inferencepool.yaml", "InferencePool");
        foreach (var (k, v) in Map(N(pool, "spec", "selector", "matchLabels"))) Assert.Equal(v, podLabels[k]);
        foreach (var (k, v) in Map(N(Kind("peftserve.yaml", "Service"), "spec", "selector"))) Assert.Equal(v, podLabels[k]);
        var port = ((YamlSequenceNode)N(container, "ports")).Cast<YamlMappingNode>().Single();
        Assert.Equal(S(port, "containerPort"), S(((YamlSequenceNode)N(pool, "spec", "targetPorts"))[0], "number"));

        // Every claim the pods mount exists.
        var claims = Documents("storage.yaml").Select(d => S(d, "metadata", "name")).ToHashSet();
        foreach (var volume in ((YamlSequenceNode)N(deployment, "spec", "template", "spec", "volumes")).Cast<YamlMappingNode>())
            Assert.Contains(S(volume, "persistentVolumeClaim", "claimName"), claims);
        // The keys come from the Secret.
        var secret = Kind("secret.yaml", "Secret");
        foreach (var env in ((YamlSequenceNode)N(container, "env")).Cast<YamlMappingNode>().Where(e => e.Children.ContainsKey(new YamlScalarNode("valueFrom"))))
        {
            Assert.Equal(S(secret, "metadata", "name"), S(env, "valueFrom", "secretKeyRef", "name"));
            Assert.True(((YamlMappingNode)N(secret, "stringData")).Children.ContainsKey(new YamlScalarNode(S(env, "valueFrom", "secretKeyRef", "key"))));
        }
    }

    [Fact]
    public void ThePickerServesThePoolAndTheRouteReachesBoth()
    {
        var pool = Kind("inferencepool.yaml", "InferencePool");
        var picker = Kind("endpoint-picker.yaml", "Deployment");
        var args = ((YamlSequenceNode)N((YamlMappingNode)((YamlSequenceNode)N(picker, "spec", "template", "spec", "containers"))[0], "args"))
            .Select(a => ((YamlScalarNode)a).Value!).ToList();
        Assert.Equal(S(pool, "metadata", "name"), args[args.IndexOf("--pool-name") + 1]);
        var pickerService = Kind("endpoint-picker.yaml", "Service");
        Assert.Equal(S(pool, "spec", "endpointPickerRef", "name"), S(pickerService, "metadata", "name"));
        Assert.Contains(((YamlSequenceNode)N(pickerService, "spec", "ports")).Cast<YamlMappingNode>(), p => S(p, "port") == S(pool, "spec", "endpointPickerRef", "port", "number"));

        // The picker's configuration names only plugins it instantiates, and scores by adapter.
        var config = new YamlStream();
        config.Load(new StringReader(S(Kind("endpoint-picker.yaml", "ConfigMap"), "data", "peftserve-epp.yaml")));
        var root = (YamlMappingNode)config.Documents[0].RootNode;
        Assert.Equal("EndpointPickerConfig", S(root, "kind"));
        var plugins = ((YamlSequenceNode)N(root, "plugins")).Select(p => S(p, "type")).ToHashSet();
        Assert.Contains("lora-affinity-scorer", plugins);
        foreach (var profile in ((YamlSequenceNode)N(root, "schedulingProfiles")).Cast<YamlMappingNode>())
            foreach (var reference in ((YamlSequenceNode)N(profile, "plugins")).Cast<YamlMappingNode>())
                Assert.Contains(S(reference, "pluginRef"), plugins);

        var backends = ((YamlSequenceNode)N(Kind("httproute.yaml", "HTTPRoute"), "spec", "rules")).Cast<YamlMappingNode>()
            .SelectMany(r => ((YamlSequenceNode)N(r, "backendRefs")).Cast<YamlMappingNode>()).Select(b => (S(b, "kind"), S(b, "name"))).ToList();
        Assert.Contains(("InferencePool", S(pool, "metadata", "name")), backends);
        Assert.Contains(("Service", S(Kind("peftserve.yaml", "Service"), "metadata", "name")), backends);
    }

    [Fact]
    public void KustomizeListsEveryManifest()
    {
        var listed = ((YamlSequenceNode)N(Documents("kustomization.yaml")[0], "resources")).Select(r => ((YamlScalarNode)r).Value!).Order();
        var files = Directory.GetFiles(Dir, "*.yaml").Select(Path.GetFileName).Where(f => f != "kustomization.yaml").Order();
        Assert.Equal(files, listed);
    }
}
