using System.Globalization;
using PeftServe.Core.Adapters;

namespace PeftServe.Server.Replication;

/// <summary>The store's version file, <c>.store-version</c> in the adapter store: rewritten by every
/// replica after each change it makes (one line naming the change), read by every replica a few times
/// a second to notice the others' changes when there is no Redis.
///
/// Why a file that is read, and not a folder watcher: inotify does not see what another NFS client
/// changed, and a directory listing on NFS may be cached for up to the mount's acdirmax (30-60 s by
/// default). Opening a file revalidates it (NFS close-to-open consistency), so a reader that opens it
/// after the writer closed it sees the new contents. The writer writes a temporary file and renames it
/// over the old one (an atomic replace, on NFS too), so a reader never sees half a line.
///
/// The line names only the last change: if two come between two reads, the reader also compares each
/// adapter folder's fingerprint (its files' sizes and modification times) with what it saw last, so the
/// earlier change is found too.</summary>
public static class StoreVersionFile
{
    public const string FileName = ".store-version";

    /// <summary>Records a change (see <see cref="Format"/>).</summary>
    public static void Write(string store, AdapterChange change)
    {
        Directory.CreateDirectory(store);
        var temp = Path.Combine(store, $"{FileName}.tmp-{Guid.NewGuid():N}");
        File.WriteAllText(temp, Format(change) + "\n");
        File.Move(temp, Path.Combine(store, FileName), overwrite: true);
    }

    /// <summary>A change as one line (also the Redis message): "{unix ms} {replica} {kind} {name}".</summary>
    public static string Format(AdapterChange change) =>
        string.Create(CultureInfo.InvariantCulture, $"{DateTimeOffset.UtcNow.ToUnixTimeMilliseconds()} {change.Origin} {change.Kind} {change.Name}");

    /// <summary>The file's contents (null when there is none yet).</summary>
    public static string? Read(string store)
    {
        try { return File.ReadAllText(Path.Combine(store, FileName)); }
        catch (FileNotFoundException) { return null; }
        catch (DirectoryNotFoundException) { return null; }
    }

    /// <summary>The change a version line names (null for an unreadable line).</summary>
    public static AdapterChange? Parse(string? line)
    {
        var parts = line?.Trim().Split(' ', 4);
        return parts is [_, var origin, var kind, var name] && AdapterNames.IsSafe(name) ? new AdapterChange(name, kind, origin) : null;
    }

    /// <summary>Per adapter folder: its files' names, sizes and modification times. A re-stored adapter is
    /// a new folder of newly written files, so its fingerprint differs from the old one's.</summary>
    public static Dictionary<string, string> Fingerprints(string store)
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        if (!Directory.Exists(store)) return result;
        foreach (var dir in new DirectoryInfo(store).EnumerateDirectories())
        {
            if (!AdapterNames.IsSafe(dir.Name)) continue;   // hidden staging and trash folders
            if (Fingerprint(dir) is { } f) result[dir.Name] = f;
        }
        return result;
    }

    /// <summary>One adapter folder's fingerprint, or null when it is not in the store.</summary>
    public static string? Fingerprint(string store, string name) => Fingerprint(new DirectoryInfo(Path.Combine(store, name)));

    private static string? Fingerprint(DirectoryInfo dir)
    {
        try
        {
            return string.Join(';', dir.EnumerateFiles().OrderBy(f => f.Name, StringComparer.Ordinal)
                .Select(f => string.Create(CultureInfo.InvariantCulture, $"{f.Name}:{f.Length}:{f.LastWriteTimeUtc.Ticks}")));
        }
        catch (IOException) { return null; }   // absent, or deleted while we looked
    }
}
