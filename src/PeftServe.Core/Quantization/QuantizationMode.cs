namespace PeftServe.Core.Quantization;

/// <summary>How the decoder's linear layers (q|k|v, o, gate|up, down) hold their frozen weights.</summary>
public enum QuantizationMode
{
    /// <summary>Dense, in the compute dtype.</summary>
    None,
    /// <summary>QLoRA 4-bit NormalFloat, block size 64, quantized at load time (see <see cref="Nf4"/>).</summary>
    Nf4,
}
