using Microsoft.Playwright;
using PeftServe.Tests;

namespace PeftServe.Server.Tests;

/// <summary>The web playground in headless Chromium (Debian's chromium, driven by Playwright for
/// .NET) against the running server: a chat streamed over SignalR, an adapter uploaded and chosen.</summary>
public sealed class PlaygroundTests
{
    private static string Chromium =>
        Environment.GetEnvironmentVariable("PEFTSERVE_CHROMIUM") is { Length: > 0 } p ? p
        : new[] { "/usr/bin/chromium", "/usr/bin/chromium-browser" }.FirstOrDefault(File.Exists)
          ?? throw new InvalidOperationException("chromium is not installed (./peftserve test installs Debian's chromium)");

    [Fact]
    public async Task AChatStreamsAndAnUploadedAdapterCanBeChosen()
    {
        await using var server = await TestServer.StartAsync();
        using var playwright = await Playwright.CreateAsync();
        await using var browser = await playwright.Chromium.LaunchAsync(new BrowserTypeLaunchOptions
        {
            ExecutablePath = Chromium,
            Headless = true,
            Args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        });
        var page = await browser.NewPageAsync();
        page.SetDefaultTimeout(30_000);
        await page.GotoAsync(server.Url + "/");
        await page.Locator("#status[data-state=connected]").WaitForAsync();
        await page.Locator("#model option[value='tiny-llama']").WaitForAsync(new() { State = WaitForSelectorState.Attached });

        await page.FillAsync("#max-tokens", "24");
        await page.FillAsync("#message", "Hello from the browser");
        await page.ClickAsync("#send");
        var reply = page.Locator("#transcript li.assistant").Last;
        await page.Locator("#transcript li.assistant[data-finish]").Last.WaitForAsync();
        Assert.Equal("24", await reply.GetAttributeAsync("data-tokens"));
        Assert.Equal("tiny-llama", await reply.GetAttributeAsync("data-model"));
        // Tokens arrived as separate stream items, the reply growing with them.
        var lengths = await page.EvaluateAsync<int[]>("() => window.peftserve.lastArrivals.map(a => a.length)");
        Assert.True(lengths.Length >= 24, $"only {lengths.Length} stream items for 24 tokens");
        Assert.True(lengths.Distinct().Count() >= 5, "the reply did not grow as tokens arrived");
        Assert.Equal(lengths.Order(), lengths);
        Assert.False(string.IsNullOrEmpty(await reply.Locator(".text").TextContentAsync()));

        // Upload an adapter through the form; the picker then offers and selects it.
        var source = Path.Combine(TestData.RepoRoot, "adapters", "tiny-lora-r4-qv");
        await page.FillAsync("#adapter-name", "browser-lora");
        await page.SetInputFilesAsync("#adapter-files", Directory.GetFiles(source));
        await page.ClickAsync("#upload");
        await page.Locator("#upload-result[data-uploaded='browser-lora']").WaitForAsync();
        Assert.True(Directory.Exists(Path.Combine(server.Store, "browser-lora")));
        Assert.Equal("browser-lora", await page.InputValueAsync("#model"));

        await page.FillAsync("#message", "And now with the adapter");
        await page.ClickAsync("#send");
        await page.Locator("#transcript li.assistant[data-model='browser-lora'][data-finish]").WaitForAsync();
        Assert.Equal(2, await page.Locator("#transcript li.assistant").CountAsync());
    }
}
