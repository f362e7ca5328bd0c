using PeftServe.Core.Model;

namespace PeftServe.Core.Adapters;

/// <summary>Adapters made resident on the device for one base model: each is read from disk once,
/// validated, and copied into a slot of its method's pool. Names resolve to folders in the adapter
/// store; a path to a folder works too.</summary>
public sealed class AdapterSet(LlamaModel model, AdapterLimits limits, string? storeDirectory = null) : IDisposable
{
    private readonly Dictionary<AdapterMethod, AdapterSlotPool> _pools = [];
    private readonly Dictionary<string, ResidentAdapter> _resident = new(StringComparer.Ordinal);
    private readonly object _lock = new();

    public AdapterLimits Limits => limits;

    /// <summary>The folder an adapter name or path refers to.</summary>
    public string Resolve(string nameOrPath)
    {
        if (Directory.Exists(nameOrPath)) return Path.GetFullPath(nameOrPath);
        if (storeDirectory is not null && AdapterNames.IsSafe(nameOrPath))
        {
            var inStore = Path.Combine(storeDirectory, nameOrPath);
            if (Directory.Exists(inStore)) return Path.GetFullPath(inStore);
        }
        throw new AdapterException($"adapter '{nameOrPath}' not found{(storeDirectory is null ? "" : $" (neither a folder nor a name in the store {storeDirectory})")}");
    }

    /// <summary>The adapter resident on the device, loading it first if needed.</summary>
    public ResidentAdapter Get(string nameOrPath)
    {
        var path = Resolve(nameOrPath);
        lock (_lock)
        {
            if (_resident.TryGetValue(path, out var hit)) return hit;
            var name = Directory.Exists(nameOrPath) ? Path.GetFileName(path.TrimEnd('/')) : nameOrPath;
            var adapter = AdapterMethods.Load(path, name, model.Config, limits);
            try
            {
                if (!_pools.TryGetValue(adapter.Method, out var pool)) _pools[adapter.Method] = pool = adapter.Method.CreatePool(model, limits);
                int used = _resident.Values.Count(r => r.Pool == pool);
                if (used >= pool.Capacity)
                    throw new AdapterException($"all {pool.Capacity} {adapter.Method.Name} slots are in use; raise the slots per method");
                pool.Store(used, adapter);
                return _resident[path] = new ResidentAdapter(adapter, pool, used);
            }
            catch
            {
                adapter.Dispose();
                throw;
            }
        }
    }

    public void Dispose()
    {
        foreach (var r in _resident.Values) r.Adapter.Dispose();
        foreach (var p in _pools.Values) p.Dispose();
    }
}

/// <summary>Which adapter names are safe to resolve inside the store.</summary>
public static class AdapterNames
{
    /// <summary>Letters, digits, '.', '_' and '-', not starting with '.', at most 128 characters.</summary>
    public static bool IsSafe(string name) =>
        name.Length is > 0 and <= 128 && name[0] != '.' && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-');
}
