using Microsoft.Extensions.Caching.Memory;
using PeftServe.Core.Adapters;
using PeftServe.Core.Cuda;
using PeftServe.Core.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Engine;

/// <summary>Adapters in three tiers, as S-LoRA keeps them: a fixed pool of device slots per method (the
/// adapters a batch can use), validated copies in host memory (a <see cref="MemoryCache"/> bounded in
/// bytes), and the adapter store on disk. A request asks for its adapter between decode steps; if the
/// adapter is not on the device it is read from disk on a worker thread (once, however many requests
/// wait for it) and copied into a free slot, or into the least recently used slot that no running
/// sequence holds. The engine thread is the only caller of <see cref="TryAcquire"/> and
/// <see cref="Release"/>; <see cref="Invalidate"/> may come from any thread.</summary>
public sealed class AdapterManager : IDisposable
{
    private readonly LlamaModel _model;
    private readonly AdapterLimits _limits;
    private readonly string? _store;
    private readonly MemoryCache _host;
    private readonly object _gate = new();
    private readonly Dictionary<string, Task<Adapter>> _loads = new(StringComparer.Ordinal);
    private readonly Dictionary<string, Entry> _pending = new(StringComparer.Ordinal);
    private readonly Dictionary<AdapterMethod, Slot[]> _slots = [];
    private readonly Dictionary<AdapterMethod, AdapterSlotPool> _pools = [];
    private readonly Dictionary<string, Slot> _onDevice = new(StringComparer.Ordinal);
    private long _tick, _deviceHits, _hostHits, _misses, _diskLoads, _deviceLoads, _deviceEvictions, _hostEvictions, _hostBytes;

    public AdapterManager(LlamaModel model, AdapterLimits limits, string? storeDirectory, long hostCacheBytes)
    {
        _model = model;
        _limits = limits;
        _store = storeDirectory is null ? null : Path.GetFullPath(storeDirectory);
        _host = new MemoryCache(new MemoryCacheOptions { SizeLimit = Math.Max(1, hostCacheBytes) });
    }

    /// <summary>Raised (on a worker thread) when a disk read finished, so the engine can place the adapter.</summary>
    public event Action? LoadFinished;

    /// <summary>The adapter store's folder, if any.</summary>
    public string? StoreDirectory => _store;

    /// <summary>The folder an adapter name (in the store) or path refers to; throws when there is none.</summary>
    public string Resolve(string nameOrPath)
    {
        if (_store is not null && AdapterNames.IsSafe(nameOrPath))
        {
            var inStore = Path.Combine(_store, nameOrPath);
            if (File.Exists(Path.Combine(inStore, AdapterFolder.ConfigFile))) return inStore;
        }
        // A folder path (absolute, relative with a separator, or a folder in the working directory).
        if (File.Exists(Path.Combine(nameOrPath, AdapterFolder.ConfigFile))) return Path.GetFullPath(nameOrPath).TrimEnd('/');
        throw new AdapterException($"adapter '{nameOrPath}' not found" + (_store is null ? "" : $" in the adapter store {_store}"));
    }

    /// <summary>The adapter at <paramref name="path"/> (from <see cref="Resolve"/>) held in a device slot
    /// for one sequence, or null while it is still loading or every slot of its method is held. Pass
    /// <paramref name="firstAttempt"/> on a request's first call, so that hits and misses count once per
    /// request. Throws <see cref="AdapterException"/> when the adapter cannot be loaded.</summary>
    public ResidentAdapter? TryAcquire(string path, bool firstAttempt)
    {
        lock (_gate)
        {
            if (_onDevice.TryGetValue(path, out var resident))
            {
                // Still being copied to the device: come back later (the copy signals LoadFinished).
                if (resident.Copy is { } copy)
                {
                    if (!copy.IsDone) return null;
                    copy.Dispose();
                    resident.Copy = null;
                }
                resident.Refs++;
                resident.LastUsed = ++_tick;
                if (firstAttempt) _deviceHits++;
                return resident.Resident;
            }
            var entry = HostEntry(path, firstAttempt);
            if (entry is null) return null;
            return Place(path, entry);
        }
    }

    /// <summary>The sequence that held <paramref name="adapter"/> is done with it.</summary>
    /// <summary>Resolves, reads (if it is not cached) and places an adapter, waiting for it: for one-shot
    /// tools (the logits verb, tests) that have no scheduler to come back later. The adapter stays held
    /// until <see cref="Release"/>. Throws when every slot of its method is held.</summary>
    public ResidentAdapter Acquire(string nameOrPath)
    {
        var path = Resolve(nameOrPath);
        for (bool first = true; ; first = false)
        {
            if (TryAcquire(path, first) is { } resident) return resident;
            Task<Adapter>? load;
            DeviceCopy? copy = null;
            lock (_gate)
            {
                _loads.TryGetValue(path, out load);
                if (_onDevice.TryGetValue(path, out var slot)) copy = slot.Copy;
            }
            if (load is not null) { try { load.Wait(); } catch (AggregateException) { } continue; }
            if (copy is not null) { try { copy.Wait(); } catch (CudaException) { } continue; }
            lock (_gate)
                if (_pending.ContainsKey(path))
                    throw new AdapterException($"adapter '{nameOrPath}' is loaded but every device slot of its method is held; raise the slots per method");
        }
    }

    public void Release(ResidentAdapter adapter)
    {
        lock (_gate)
        {
            var slot = _slots[adapter.Pool.Method][adapter.Slot];
            if (slot.Refs <= 0) throw new InvalidOperationException($"adapter slot {adapter.Slot} of {adapter.Pool.Method.Name} released more often than acquired");
            slot.Refs--;
        }
    }

    /// <summary>Forgets every cached copy of an adapter whose folder changed or went away: later requests
    /// read it again; sequences running on the old copy finish on it (its slot is reused once they end).</summary>
    public void Invalidate(string nameOrPath)
    {
        var path = nameOrPath;
        if (_store is not null && AdapterNames.IsSafe(nameOrPath)) path = Path.Combine(_store, nameOrPath);
        lock (_gate)
        {
            if (_onDevice.Remove(path, out var slot)) slot.Key = null;
            // A read still under way belongs to the old files: nobody will take its result (later requests
            // start a new read), so it is disposed when it ends instead of lingering.
            if (_loads.Remove(path, out var orphan))
                orphan.ContinueWith(t =>
                {
                    if (t.IsCompletedSuccessfully) t.Result.Dispose();
                    Interlocked.Increment(ref _discardedLoads);
                }, TaskScheduler.Default);
            if (_pending.Remove(path, out var pending)) { pending.Pinned = false; pending.DisposeIfUnused(); }
        }
        _host.Remove(path);
    }

    public AdapterCacheStats Stats
    {
        get
        {
            lock (_gate)
                return new AdapterCacheStats
                {
                    DeviceHits = _deviceHits, HostHits = _hostHits, Misses = _misses, DiskLoads = _diskLoads,
                    DeviceLoads = _deviceLoads, DeviceEvictions = _deviceEvictions, HostEvictions = _hostEvictions,
                    DeviceResident = _onDevice.Count, HostBytes = Interlocked.Read(ref _hostBytes),
                };
        }
    }

    /// <summary>Slots held by running sequences (for tests: 0 once all requests ended).</summary>
    /// <summary>Reads from the store whose result was discarded because the adapter changed meanwhile.</summary>
    internal long DiscardedLoads => Interlocked.Read(ref _discardedLoads);
    private long _discardedLoads;

    public int HeldSlots
    {
        get { lock (_gate) return _slots.Values.Sum(s => s.Count(x => x.Refs > 0)); }
    }

    /// <summary>The validated host copy, starting (or checking on) the disk read when there is none.</summary>
    private Entry? HostEntry(string path, bool firstAttempt)
    {
        if (_pending.TryGetValue(path, out var pending)) return pending;
        if (_host.TryGetValue(path, out Entry? cached) && cached is not null && !cached.Disposed)
        {
            if (firstAttempt) _hostHits++;
            return cached;
        }
        if (!_loads.TryGetValue(path, out var load))
        {
            if (firstAttempt) _misses++;
            _diskLoads++;
            var name = _store is not null && Path.GetDirectoryName(path) == _store ? Path.GetFileName(path) : path;
            // Reading and validating is file and CPU work: off the engine thread, so decoding goes on.
            // Read, validated, and turned into the serving dtype (in pinned memory for a GPU) on this thread, so
            // that placing it later is one asynchronous copy.
            var task = Task.Run(() =>
            {
                // The scope holds every tensor made here until the adapter is ready, so that no temporary is left to a
                // finalizer while a native call still uses it (a pool thread has no scope of its own; docs/reliability.md).
                // Then what is still alive is detached: the adapter's tensors are its own, as without the scope.
                using var scope = torch.NewDisposeScope();
                var adapter = AdapterMethods.Load(path, name, _model.Config, _limits);
                try { adapter.PrepareForDevice(_model.DType, pin: _model.Device.type == DeviceType.CUDA); }
                catch { adapter.Dispose(); throw; }
                scope.Detach(scope.DisposablesView);
                return adapter;
            });
            _loads[path] = task;
            task.ContinueWith(_ => LoadFinished?.Invoke(), TaskScheduler.Default);
            return null;
        }
        if (!load.IsCompleted) return null;
        _loads.Remove(path);
        if (!load.IsCompletedSuccessfully)
        {
            var error = load.Exception?.InnerException ?? new AdapterException($"adapter {path} could not be loaded");
            throw error as AdapterException ?? new AdapterException($"adapter {path} could not be loaded: {error.Message}");
        }
        var entry = new Entry(load.Result, this) { Pinned = true };
        _pending[path] = entry;   // held until it reaches a slot, whatever the host cache decides
        entry.InHost = true;
        Interlocked.Add(ref _hostBytes, entry.Adapter.ByteSize);
        var options = new MemoryCacheEntryOptions { Size = Math.Max(1, entry.Adapter.ByteSize) }
            .RegisterPostEvictionCallback((_, value, reason, _) => ((Entry)value!).EvictedFromHost(reason));
        _host.Set(path, entry, options);
        return entry;
    }

    /// <summary>Copies an adapter into a slot of its method's pool: a free one, else the least recently
    /// used one that no sequence holds. Null when every slot is held.</summary>
    private ResidentAdapter? Place(string path, Entry entry)
    {
        var method = entry.Adapter.Method;
        if (!_pools.TryGetValue(method, out var pool))
        {
            _pools[method] = pool = method.CreatePool(_model, _limits);
            _slots[method] = Enumerable.Range(0, pool.Capacity).Select(i => new Slot(i)).ToArray();
        }
        var slots = _slots[method];
        var victim = slots.Where(s => s.Refs == 0 && (s.Copy is null || s.Copy.IsDone)).OrderBy(s => s.Entry is null ? 0 : 1).ThenBy(s => s.LastUsed).FirstOrDefault();
        if (victim is null) return null;
        victim.Copy?.Dispose();
        victim.Copy = null;
        if (victim.Entry is { } old)
        {
            if (victim.Key is not null) { _onDevice.Remove(victim.Key); _deviceEvictions++; }
            old.OnDevice = false;
            old.DisposeIfUnused();
            victim.Entry = null;
            victim.Key = null;
        }
        DeviceCopy? copy;
        try { copy = pool.StoreAsync(victim.Index, entry.Adapter); }
        catch
        {
            _pending.Remove(path);
            entry.Pinned = false;
            entry.DisposeIfUnused();
            throw;
        }
        _pending.Remove(path);
        entry.Pinned = false;
        entry.OnDevice = true;
        victim.Entry = entry;
        victim.Key = path;
        victim.LastUsed = ++_tick;
        victim.Resident = new ResidentAdapter(entry.Adapter, pool, victim.Index);
        _onDevice[path] = victim;
        _deviceLoads++;
        if (copy is not null)
        {
            // The copy runs beside the decode steps; the request waits for it without holding anyone up.
            victim.Copy = copy;
            Task.Run(() =>
            {
                try { copy.Wait(); }
                catch (Exception) { }
                LoadFinished?.Invoke();
            });
            return null;
        }
        victim.Refs = 1;
        return victim.Resident;
    }

    public void Dispose()
    {
        _host.Dispose();
        lock (_gate)
        {
            foreach (var s in _slots.Values.SelectMany(x => x)) { if (s.Entry is { } e) { e.OnDevice = false; e.DisposeIfUnused(); } }
            foreach (var e in _pending.Values) { e.Pinned = false; e.InHost = false; e.DisposeIfUnused(); }
            foreach (var p in _pools.Values) p.Dispose();
        }
    }

    private sealed class Slot(int index)
    {
        public int Index { get; } = index;
        public string? Key { get; set; }
        public Entry? Entry { get; set; }
        public int Refs { get; set; }
        public long LastUsed { get; set; }
        public ResidentAdapter Resident { get; set; } = null!;
        /// <summary>The copy into this slot still under way, or null.</summary>
        public DeviceCopy? Copy { get; set; }
    }

    /// <summary>A host copy of an adapter, disposed once no tier holds it (the host cache may evict it
    /// while a device slot still serves from, and reports on, the same object).</summary>
    private sealed class Entry(Adapter adapter, AdapterManager owner)
    {
        public Adapter Adapter { get; } = adapter;
        public bool InHost { get; set; }
        public bool OnDevice { get; set; }
        public bool Pinned { get; set; }
        public bool Disposed { get; private set; }

        public void EvictedFromHost(EvictionReason reason)
        {
            lock (owner._gate)
            {
                if (!InHost) return;
                InHost = false;
                Interlocked.Add(ref owner._hostBytes, -Adapter.ByteSize);
                if (reason is EvictionReason.Capacity or EvictionReason.Expired or EvictionReason.TokenExpired) owner._hostEvictions++;
                DisposeIfUnused();
            }
        }

        public void DisposeIfUnused()
        {
            if (InHost || OnDevice || Pinned || Disposed) return;
            Disposed = true;
            Adapter.Dispose();
        }
    }
}
