//! Plain (non-residual) networks: our SmallCNN and the CIFAR VGG-16 with BN.

use crate::backend::ConvParams;
use crate::error::{Error, Result};
use crate::graph::Builder;

fn cp(stride: usize, pad: usize) -> ConvParams {
    ConvParams::new(stride, pad)
}

/// conv(32)-bn-relu, conv(32)-bn-relu, maxpool2, conv(64)-bn-relu,
/// conv(64)-bn-relu, maxpool2, fc(256)-relu, fc(classes); 3×3 convs, pad 1, bias.
pub(super) fn smallcnn(b: &mut Builder, x: usize, classes: usize) -> Result<usize> {
    let mut x = x;
    for (i, ch) in [32, 32, 64, 64].into_iter().enumerate() {
        x = b.conv(x, &format!("conv{}", i + 1), ch, 3, cp(1, 1), true)?;
        x = b.bn(x, &format!("bn{}", i + 1));
        x = b.relu(x);
        if i == 1 || i == 3 {
            x = b.max_pool(x, 2, 2, 0)?;
        }
    }
    x = b.flatten(x);
    x = b.linear(x, "fc1", 256, true);
    x = b.relu(x);
    Ok(b.linear(x, "fc2", classes, true))
}

/// VGG-16 with BN as in the common CIFAR code: `features.N` numbered like the
/// PyTorch `Sequential` (conv, bn, relu take three slots, a max-pool one),
/// then `classifier`. The trailing `AvgPool2d(1, 1)` is the identity.
pub(super) fn vgg16(b: &mut Builder, x: usize, classes: usize) -> Result<usize> {
    const CFG: [usize; 18] = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let [_, h, w] = b.shape(x).try_into().unwrap_or([0, 0, 0]);
    if h < 32 || w < 32 {
        return Err(Error::arg(
            "--input-shape",
            format!("vgg16 halves the image five times and needs at least 32x32, got {h}x{w}"),
        ));
    }
    let mut x = x;
    let mut idx = 0;
    for v in CFG {
        if v == 0 {
            x = b.max_pool(x, 2, 2, 0)?;
            idx += 1;
        } else {
            x = b.conv(x, &format!("features.{idx}"), v, 3, cp(1, 1), true)?;
            x = b.bn(x, &format!("features.{}", idx + 1));
            x = b.relu(x);
            idx += 3;
        }
    }
    x = b.flatten(x);
    Ok(b.linear(x, "classifier", classes, true))
}
