using PeftServe.Core.Adapters;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Engine;

/// <summary>Everything one decode step reads about its rows, in one int64 buffer: token ids, positions,
/// the KV slot each new token is written to, how many keys each row attends to, one adapter-slot column
/// per adapter method (-1: none), and the block tables. The host fills a pinned copy; one asynchronous
/// copy uploads it before the forward is queued, so the pass itself never waits on the host. On CUDA the
/// device buffer is also what a captured graph reads: a replay only needs new values copied in.</summary>
internal sealed unsafe class DecodeInputs : IDisposable
{
    private readonly Tensor _host, _device;
    private readonly long* _data;
    private readonly int _methods;

    /// <summary>Rows the buffer holds (a graph's batch size; padding rows attend to nothing).</summary>
    public int Rows { get; }
    /// <summary>Block-table width: the most blocks one sequence can have.</summary>
    public int MaxBlocks { get; }

    public Tensor TokenIds { get; }
    public Tensor Positions { get; }
    public Tensor WriteSlots { get; }
    public Tensor ContextLengths { get; }
    public Tensor BlockTables { get; }
    private readonly Tensor[] _adapterSlots;

    public DecodeInputs(int rows, int maxBlocks, Device device)
    {
        Rows = rows;
        MaxBlocks = maxBlocks;
        _methods = AdapterMethods.All.Count;
        long length = (4L + _methods) * rows + (long)rows * maxBlocks;
        _host = torch.zeros([length], ScalarType.Int64);
        if (device.type == DeviceType.CUDA)
        {
            var pinned = _host.pin_memory();
            _host.Dispose();
            _host = pinned;
            _device = torch.zeros([length], ScalarType.Int64, device);
        }
        else _device = _host;
        _data = (long*)Cuda.KernelModule.Arg.Ptr(_host);
        TokenIds = _device.narrow(0, 0, rows);
        Positions = _device.narrow(0, rows, rows);
        WriteSlots = _device.narrow(0, 2L * rows, rows);
        ContextLengths = _device.narrow(0, 3L * rows, rows);
        _adapterSlots = Enumerable.Range(0, _methods).Select(m => _device.narrow(0, (4L + m) * rows, rows)).ToArray();
        BlockTables = _device.narrow(0, (4L + _methods) * rows, (long)rows * maxBlocks).view(rows, maxBlocks);
    }

    /// <summary>[Rows] slot column of <paramref name="method"/> (a view of the device buffer).</summary>
    public Tensor AdapterSlots(AdapterMethod method) => _adapterSlots[MethodIndex(method)];

    public static int MethodIndex(AdapterMethod method)
    {
        for (int i = 0; i < AdapterMethods.All.Count; i++)
            if (AdapterMethods.All[i] == method) return i;
        throw new ArgumentException($"adapter method '{method.Name}' is not registered in AdapterMethods.All");
    }

    /// <summary>Fills row <paramref name="row"/> (host side): a token at <paramref name="position"/> written to
    /// KV slot <paramref name="writeSlot"/>, attending to <paramref name="contextLength"/> keys through
    /// <paramref name="blocks"/>, with adapter slot <paramref name="adapterSlot"/> of <paramref name="method"/> (or none).</summary>
    public void SetRow(int row, long token, long position, long writeSlot, long contextLength, IReadOnlyList<int> blocks, AdapterMethod? method, int adapterSlot)
    {
        _data[row] = token;
        _data[Rows + row] = position;
        _data[2 * Rows + row] = writeSlot;
        _data[3 * Rows + row] = contextLength;
        int methodIndex = method is null ? -1 : MethodIndex(method);
        for (int m = 0; m < _methods; m++) _data[(4 + m) * Rows + row] = m == methodIndex ? adapterSlot : -1;
        long* table = _data + (4L + _methods) * Rows + (long)row * MaxBlocks;
        if (blocks.Count > MaxBlocks) throw new InvalidOperationException($"a sequence holds {blocks.Count} blocks; the decode inputs take at most {MaxBlocks}");
        for (int i = 0; i < blocks.Count; i++) table[i] = blocks[i];
        for (int i = blocks.Count; i < MaxBlocks; i++) table[i] = 0;
    }

    /// <summary>A padding row: token 0 written to the scratch slot, attending to nothing, no adapter.</summary>
    public void SetPadding(int row) => SetRow(row, 0, 0, PagedKvCache.ScratchSlot, 0, [], null, -1);

    /// <summary>Copies the host side to the device, asynchronously where the device is a GPU. The host side
    /// must not be refilled before this copy ran: the step's read-back of its sampled ids guarantees that.</summary>
    public void Upload()
    {
        if (!ReferenceEquals(_device, _host)) _device.copy_(_host, nonBlocking: true);
    }

    public void Dispose()
    {
        TokenIds.Dispose();
        Positions.Dispose();
        WriteSlots.Dispose();
        ContextLengths.Dispose();
        BlockTables.Dispose();
        foreach (var t in _adapterSlots) t.Dispose();
        if (!ReferenceEquals(_device, _host)) _device.Dispose();
        _host.Dispose();
    }
}
