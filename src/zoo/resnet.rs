//! Residual networks: the common CIFAR ResNets (basic, bottleneck and
//! pre-activation blocks), the RobustBench WideResNet, and torchvision's
//! ImageNet ResNet-50. Parameters are registered in PyTorch's order.

use crate::backend::ConvParams;
use crate::error::Result;
use crate::graph::Builder;

fn cp(stride: usize, pad: usize) -> ConvParams {
    ConvParams::new(stride, pad)
}

/// The residual block family of a CIFAR ResNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Block {
    /// Two 3×3 convs (ResNet-18/34).
    Basic,
    /// 1×1, 3×3, 1×1 with 4× expansion (ResNet-50).
    Bottleneck,
    /// Pre-activation: BN-ReLU before each conv, no BN on the shortcut.
    PreAct,
}

impl Block {
    fn expansion(self) -> usize {
        if self == Block::Bottleneck {
            4
        } else {
            1
        }
    }
}

/// conv + BN, as `conv_bn` in the reference: padding k/2, no bias.
fn conv_bn(
    b: &mut Builder,
    x: usize,
    conv: &str,
    bn: &str,
    out: usize,
    k: usize,
    stride: usize,
) -> Result<usize> {
    let y = b.conv(x, conv, out, k, cp(stride, k / 2), false)?;
    Ok(b.bn(y, bn))
}

fn block(
    b: &mut Builder,
    x: usize,
    kind: Block,
    name: &str,
    planes: usize,
    stride: usize,
) -> Result<usize> {
    let cin = b.shape(x)[0];
    let cout = planes * kind.expansion();
    let needs_shortcut = stride != 1 || cin != cout;
    let n = |s: &str| format!("{name}.{s}");
    match kind {
        Block::Basic => {
            let mut y = conv_bn(b, x, &n("conv1"), &n("bn1"), planes, 3, stride)?;
            y = b.relu(y);
            y = conv_bn(b, y, &n("conv2"), &n("bn2"), planes, 3, 1)?;
            let skip = if needs_shortcut {
                conv_bn(b, x, &n("shortcut.0"), &n("shortcut.1"), cout, 1, stride)?
            } else {
                x
            };
            let s = b.add(y, skip)?;
            Ok(b.relu(s))
        }
        Block::Bottleneck => {
            let mut y = conv_bn(b, x, &n("conv1"), &n("bn1"), planes, 1, 1)?;
            y = b.relu(y);
            y = conv_bn(b, y, &n("conv2"), &n("bn2"), planes, 3, stride)?;
            y = b.relu(y);
            y = conv_bn(b, y, &n("conv3"), &n("bn3"), cout, 1, 1)?;
            let skip = if needs_shortcut {
                conv_bn(b, x, &n("shortcut.0"), &n("shortcut.1"), cout, 1, stride)?
            } else {
                x
            };
            let s = b.add(y, skip)?;
            Ok(b.relu(s))
        }
        Block::PreAct => {
            let a = b.bn(x, &n("bn1"));
            let a = b.relu(a);
            let mut y = b.conv(a, &n("conv1"), planes, 3, cp(stride, 1), false)?;
            y = b.bn(y, &n("bn2"));
            y = b.relu(y);
            y = b.conv(y, &n("conv2"), planes, 3, cp(1, 1), false)?;
            let skip = if needs_shortcut {
                b.conv(a, &n("shortcut.0"), cout, 1, cp(stride, 0), false)?
            } else {
                x
            };
            b.add(y, skip)
        }
    }
}

/// The common CIFAR ResNet: 3×3 stem (64), no max-pool, four stages of
/// `blocks[i]` blocks (64, 128, 256, 512 planes), global average pool, `linear`.
pub(super) fn cifar_resnet(
    b: &mut Builder,
    x: usize,
    kind: Block,
    blocks: [usize; 4],
    classes: usize,
) -> Result<usize> {
    let mut x = b.conv(x, "conv1", 64, 3, cp(1, 1), false)?;
    if kind != Block::PreAct {
        x = b.bn(x, "bn1");
        x = b.relu(x);
    }
    for (i, (planes, count)) in [64, 128, 256, 512].into_iter().zip(blocks).enumerate() {
        for j in 0..count {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            x = block(b, x, kind, &format!("layer{}.{j}", i + 1), planes, stride)?;
        }
    }
    x = b.global_avg_pool(x);
    Ok(b.linear(x, "linear", classes, true))
}

/// The WideResNet of RobustBench / TRADES (`block1.layer.0.bn1`, ...):
/// depth `depth`, widening factor `widen`, final BN-ReLU, global pool, `fc`.
pub(super) fn wide_resnet(
    b: &mut Builder,
    x: usize,
    depth: usize,
    widen: usize,
    classes: usize,
) -> Result<usize> {
    let n = (depth - 4) / 6;
    let widths = [16 * widen, 32 * widen, 64 * widen];
    let mut x = b.conv(x, "conv1", 16, 3, cp(1, 1), false)?;
    for (g, width) in widths.into_iter().enumerate() {
        for i in 0..n {
            let stride = if g > 0 && i == 0 { 2 } else { 1 };
            let name = format!("block{}.layer.{i}", g + 1);
            let cin = b.shape(x)[0];
            let a = b.bn(x, &format!("{name}.bn1"));
            let a = b.relu(a);
            let mut y = b.conv(a, &format!("{name}.conv1"), width, 3, cp(stride, 1), false)?;
            y = b.bn(y, &format!("{name}.bn2"));
            y = b.relu(y);
            y = b.conv(y, &format!("{name}.conv2"), width, 3, cp(1, 1), false)?;
            let skip = if cin == width {
                x
            } else {
                b.conv(
                    a,
                    &format!("{name}.convShortcut"),
                    width,
                    1,
                    cp(stride, 0),
                    false,
                )?
            };
            x = b.add(skip, y)?;
        }
    }
    x = b.bn(x, "bn1");
    x = b.relu(x);
    x = b.global_avg_pool(x);
    Ok(b.linear(x, "fc", classes, true))
}

/// torchvision's `resnet50` (V1.5: stride on the 3×3 conv): 7×7/2 stem,
/// 3×3/2 max-pool, bottleneck stages with `downsample.{0,1}`, `fc`.
pub(super) fn imagenet_resnet50(b: &mut Builder, x: usize, classes: usize) -> Result<usize> {
    let mut x = b.conv(x, "conv1", 64, 7, cp(2, 3), false)?;
    x = b.bn(x, "bn1");
    x = b.relu(x);
    x = b.max_pool(x, 3, 2, 1)?;
    for (i, (planes, count)) in [64, 128, 256, 512]
        .into_iter()
        .zip([3, 4, 6, 3])
        .enumerate()
    {
        for j in 0..count {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            let name = format!("layer{}.{j}", i + 1);
            let n = |s: &str| format!("{name}.{s}");
            let cin = b.shape(x)[0];
            let mut y = conv_bn(b, x, &n("conv1"), &n("bn1"), planes, 1, 1)?;
            y = b.relu(y);
            y = conv_bn(b, y, &n("conv2"), &n("bn2"), planes, 3, stride)?;
            y = b.relu(y);
            y = conv_bn(b, y, &n("conv3"), &n("bn3"), planes * 4, 1, 1)?;
            let skip = if j == 0 && (stride != 1 || cin != planes * 4) {
                conv_bn(
                    b,
                    x,
                    &n("downsample.0"),
                    &n("downsample.1"),
                    planes * 4,
                    1,
                    stride,
                )?
            } else {
                x
            };
            let s = b.add(y, skip)?;
            x = b.relu(s);
        }
    }
    x = b.global_avg_pool(x);
    Ok(b.linear(x, "fc", classes, true))
}
