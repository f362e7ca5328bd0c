using Microsoft.Extensions.Logging.Abstractions;
using PeftServe.Core.Adapters;
using PeftServe.Core.Model;
using PeftServe.Server.Api;

namespace PeftServe.Server.Adapters;

/// <summary>Limits on what an upload may hold.</summary>
public sealed record UploadLimits
{
    public long MaxBytes { get; init; } = 512L << 20;
    public int MaxFiles { get; init; } = 16;
}

/// <summary>The adapter store on disk, as the upload and delete endpoints change it. An upload is
/// unpacked into a hidden temporary folder inside the store, validated against the base model, and
/// only then renamed into place, so a crash mid-upload leaves nothing half-written under a real name.</summary>
public sealed class AdapterStore(string directory, ModelConfig baseModel, AdapterLimits adapterLimits, UploadLimits limits, ILogger? log = null)
{
    private readonly ILogger _log = log ?? NullLogger.Instance;
    private static readonly string[] KnownFiles = [AdapterFolder.ConfigFile, AdapterFolder.WeightsFile, "README.md"];
    private readonly object _lock = new();

    public string Directory { get; } = Path.GetFullPath(directory);

    /// <summary>Removes what uploads or deletes cut short by a crash left behind (hidden folders only).</summary>
    public int RemoveLeftovers()
    {
        if (!System.IO.Directory.Exists(Directory)) return 0;
        int removed = 0;
        foreach (var d in System.IO.Directory.GetDirectories(Directory))
        {
            var n = Path.GetFileName(d);
            if (!n.StartsWith(".upload-", StringComparison.Ordinal) && !n.StartsWith(".deleted-", StringComparison.Ordinal)) continue;
            try { System.IO.Directory.Delete(d, recursive: true); removed++; }
            catch (IOException) { }
        }
        return removed;
    }

    /// <summary>Bytes still allowed in the upload being saved (all files together).</summary>
    private sealed class Budget(long bytes) { public long Left = bytes; }

    public sealed record Entry(string Name, string PeftType, long Bytes, DateTimeOffset Created);

    public IReadOnlyList<Entry> List()
    {
        if (!System.IO.Directory.Exists(Directory)) return [];
        return System.IO.Directory.GetDirectories(Directory)
            .Select(d => Find(Path.GetFileName(d)))
            .OfType<Entry>().OrderBy(e => e.Name, StringComparer.Ordinal).ToList();
    }

    public Entry? Find(string name)
    {
        if (!AdapterNames.IsSafe(name)) return null;
        var dir = Path.Combine(Directory, name);
        var config = Path.Combine(dir, AdapterFolder.ConfigFile);
        if (!File.Exists(config)) return null;
        string peftType;
        try { peftType = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(config))?["peft_type"]?.GetValue<string>() ?? "?"; }
        catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or ArgumentException) { peftType = "?"; }
        var files = new DirectoryInfo(dir).GetFiles();
        return new Entry(name, peftType, files.Sum(f => f.Length), new DateTimeOffset(System.IO.Directory.GetCreationTimeUtc(dir), TimeSpan.Zero));
    }

    /// <summary>Stores an adapter from uploaded files (an adapter folder's files, or one .zip / .tar.gz).</summary>
    public Entry Save(string name, IReadOnlyList<(string FileName, Stream Content, long Length)> files)
    {
        if (!AdapterNames.IsSafe(name))
            throw new ApiException(400, $"adapter name '{name}' is not allowed: use letters, digits, '.', '_' and '-' (not first), at most 128 characters", "name");
        if (files.Count == 0) throw new ApiException(400, "no files uploaded", "files");
        if (files.Count > limits.MaxFiles) throw new ApiException(400, $"too many files ({files.Count} > {limits.MaxFiles})", "files");
        if (files.Sum(f => f.Length) > limits.MaxBytes) throw new ApiException(413, $"upload larger than {limits.MaxBytes} bytes", "files");
        System.IO.Directory.CreateDirectory(Directory);
        var staging = Path.Combine(Directory, $".upload-{Guid.NewGuid():N}");
        System.IO.Directory.CreateDirectory(staging);
        var budget = new Budget(limits.MaxBytes);
        try
        {
            try
            {
                if (files.Count == 1 && AdapterArchive.IsArchive(files[0].FileName))
                    AdapterArchive.Unpack(files[0].Content, files[0].FileName,
                        new ArchiveLimits { MaxBytes = limits.MaxBytes, MaxEntries = limits.MaxFiles },
                        (entry, data) => WriteEntry(staging, entry, data, budget));
                else foreach (var f in files) Write(staging, f.FileName, f.Content, budget);
            }
            catch (ArchiveException e)
            {
                throw e.TooLarge
                    ? new ApiException(413, $"'{files[0].FileName}': {e.Message}", "files", "upload_too_large")
                    : new ApiException(400, $"'{files[0].FileName}' is not a readable .zip or .tar.gz archive: {e.Message}", "files", "invalid_archive");
            }
            if (!File.Exists(Path.Combine(staging, AdapterFolder.ConfigFile)))
                throw new ApiException(422, $"the upload has no {AdapterFolder.ConfigFile}", "files", "invalid_adapter");

            // Checked against the base model before the adapter is visible: from the config and the
            // safetensors header, plus one scan of the raw values (no float32 copy of the weights).
            try { AdapterMethods.Validate(staging, name, baseModel, adapterLimits); }
            catch (AdapterException e)
            {
                throw new ApiException(422, e.Message.Replace(staging, name), "files", "invalid_adapter");
            }
            catch (Exception e) when (e is not ApiException)
            {
                // A malformed adapter the checks above missed: still the client's input, so a 422, but
                // the exception's own text (paths, internals) stays in the log.
                _log.LogWarning(e, "Validating uploaded adapter {Adapter} failed unexpectedly", name);
                throw new ApiException(422, "the adapter could not be validated (it is malformed in a way this server does not describe; the error is logged)", "files", "invalid_adapter");
            }

            var target = Path.Combine(Directory, name);
            lock (_lock)
            {
                if (System.IO.Directory.Exists(target)) throw Exists(name);
                // The rename claims the name. Another replica on a shared volume (no lock in common) may
                // claim it between the check above and this rename: rename(2) of a folder onto an existing,
                // non-empty folder fails (ENOTEMPTY/EEXIST), and .NET's own existence check throws too, so
                // exactly one of two replicas wins and the other answers 409. On NFS the rename is one
                // RENAME call carried out atomically by the server; what NFS does not promise is the answer
                // to a retransmitted RENAME whose first reply was lost (the server's duplicate-request cache
                // normally covers it) - docs/deploy.md.
                try { System.IO.Directory.Move(staging, target); }
                catch (IOException) when (System.IO.Directory.Exists(target)) { throw Exists(name); }
            }
            return Find(name)!;
        }
        finally
        {
            if (System.IO.Directory.Exists(staging)) System.IO.Directory.Delete(staging, recursive: true);
        }
    }

    private static ApiException Exists(string name) => new(409, $"adapter '{name}' already exists; delete it first", "name", "adapter_exists");

    /// <summary>Removes an adapter from the store (running requests keep the copy they hold).</summary>
    public bool Delete(string name)
    {
        if (!AdapterNames.IsSafe(name)) return false;
        var dir = Path.Combine(Directory, name);
        lock (_lock)
        {
            if (!System.IO.Directory.Exists(dir)) return false;
            var trash = Path.Combine(Directory, $".deleted-{Guid.NewGuid():N}");
            // Another replica may delete it between the check and the rename: then it is gone, and that one deleted it.
            try { System.IO.Directory.Move(dir, trash); }
            catch (IOException) when (!System.IO.Directory.Exists(dir)) { return false; }
            System.IO.Directory.Delete(trash, recursive: true);
        }
        return true;
    }

    /// <summary>Writes one known file, by its bare name only (no folders, nothing escaping the staging folder).</summary>
    private void Write(string staging, string fileName, Stream content, Budget budget)
    {
        var bare = Path.GetFileName(fileName.Replace('\\', '/'));
        if (!KnownFiles.Contains(bare))
            throw new ApiException(400, $"unexpected file '{fileName}': an adapter holds {string.Join(", ", KnownFiles)}", "files");
        var path = Path.Combine(staging, bare);
        if (File.Exists(path)) throw new ApiException(400, $"file '{bare}' given twice", "files");
        using var output = File.Create(path);
        CopyLimited(content, output, budget, limits.MaxBytes, fileName);
    }

    /// <summary>Archive entries may sit in one top-level folder; anything with '..' or a root is refused.</summary>
    private void WriteEntry(string staging, string entryName, Stream data, Budget budget)
    {
        var normalized = entryName.Replace('\\', '/');
        if (normalized.StartsWith('/') || normalized.Split('/').Any(p => p == ".."))
            throw new ApiException(400, $"archive entry '{entryName}' escapes the adapter folder", "files");
        var parts = normalized.Split('/', StringSplitOptions.RemoveEmptyEntries);
        if (parts.Length > 2) throw new ApiException(400, $"archive entry '{entryName}' is nested too deep", "files");
        Write(staging, parts[^1], data, budget);   // the unpacker owns (and finally checks) the entry's stream
    }

    /// <summary>Copies at most what the budget allows, counting the bytes actually read (an archive's
    /// declared sizes are not trusted).</summary>
    private static void CopyLimited(Stream from, Stream to, Budget budget, long max, string name)
    {
        var buffer = new byte[81920];
        int read;
        while ((read = from.Read(buffer)) > 0)
        {
            budget.Left -= read;
            if (budget.Left < 0) throw new ApiException(413, $"the upload unpacks to more than {max} bytes (at '{name}')", "files", "upload_too_large");
            to.Write(buffer, 0, read);
        }
    }
}
