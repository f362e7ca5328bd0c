using PeftServe.Core.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace PeftServe.Core.Tests.Runtime;

/// <summary>The process-lifetime Scalars (Runtime/Scalars.cs): one object per value and type, kept (so no finalizer can
/// free it under a native call), and the same value and type an implicit conversion would give.</summary>
public sealed class ScalarsTests
{
    [Fact]
    public void EachValueAndTypeIsOneKeptObject()
    {
        Assert.Same(Scalars.Of(0.5f), Scalars.Of(0.5f));
        Assert.Same(Scalars.Of(7L), Scalars.Of(7L));
        Assert.Same(Scalars.One, Scalars.Of(1));
        Assert.NotSame(Scalars.Of(1), Scalars.Of(1L));
        Assert.NotSame(Scalars.Of(0f), Scalars.Of(-0f));          // keyed by bits: -0 stays -0
        // The type an implicit conversion gives (libtorch keeps a floating scalar as a double, an integral one as an int64).
        Scalar Implicit(Scalar s) => s;
        Assert.Equal(Implicit(0.5f).Type, Scalars.Of(0.5f).Type);
        Assert.Equal(Implicit(3L).Type, Scalars.Of(3L).Type);
        Assert.Equal(Implicit(1).Type, Scalars.One.Type);
    }

    [Fact]
    public void OpsGiveWhatTheImplicitConversionsGive()
    {
        using var scope = NewDisposeScope();
        var x = torch.arange(6, dtype: ScalarType.Float32);
        Assert.True(x.add(Scalars.Of(0.5f), Scalars.One).eq(x + 0.5f).all().item<bool>());
        Assert.True(x.masked_fill(x.gt(Scalars.Of(2f)), Scalars.Of(float.NegativeInfinity)).eq(x.masked_fill(x > 2f, float.NegativeInfinity)).all().item<bool>());
        var n = torch.arange(6, dtype: ScalarType.Int64);
        Assert.True(n.mul(Scalars.Of(unchecked((long)0x9E3779B97F4A7C15UL))).eq(n * unchecked((long)0x9E3779B97F4A7C15UL)).all().item<bool>());
    }
}
