using System.Net.Http.Headers;
using PeftServe.Core.Adapters;

namespace PeftServe.Trainer;

/// <summary>Sends a trained adapter's two files to a running server as one multipart/form-data POST
/// (form field <c>name</c>, files under <c>files</c>), the shape the server's adapter store takes.
/// An API key (PEFTSERVE_API_KEY) goes as a bearer token.</summary>
public static class AdapterUpload
{
    public static async Task<string> UploadAsync(string url, string adapterDir, string name, string? apiKey, CancellationToken cancel = default)
    {
        if (!Uri.TryCreate(url, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            throw new ArgumentException($"--upload {url}: not an http(s) URL");
        using var http = new HttpClient { Timeout = TimeSpan.FromMinutes(5) };
        using var form = new MultipartFormDataContent { { new StringContent(name), "name" } };
        foreach (var file in new[] { AdapterFolder.ConfigFile, AdapterFolder.WeightsFile })
        {
            var content = new ByteArrayContent(await File.ReadAllBytesAsync(Path.Combine(adapterDir, file), cancel));
            content.Headers.ContentType = new MediaTypeHeaderValue("application/octet-stream");
            form.Add(content, "files", file);
        }
        using var request = new HttpRequestMessage(HttpMethod.Post, uri) { Content = form };
        if (!string.IsNullOrEmpty(apiKey)) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", apiKey);
        using var response = await http.SendAsync(request, cancel);
        var body = await response.Content.ReadAsStringAsync(cancel);
        if (!response.IsSuccessStatusCode)
            throw new IOException($"--upload {url}: the server answered {(int)response.StatusCode} {response.ReasonPhrase}: {body}");
        return body;
    }
}
