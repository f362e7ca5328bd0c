using PeftServe.Tests;

namespace PeftServe.Core.Tests;

public class TestDataTests
{
    [Fact]
    public void FixturesAndDefaultModelArePresent()
    {
        Assert.True(File.Exists(TestData.ExpectedPath));
        Assert.True(File.Exists(Path.Combine(TestData.TinyLlamaDir, "config.json")));
        Assert.True(File.Exists(Path.Combine(TestData.AdapterDir("lora-r8-all"), "adapter_config.json")));
    }
}
