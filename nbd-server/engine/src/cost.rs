//! A layer's cost model: how many throttle units (bytes of buffer memory)
//! a request may use, per operation, as `base + per_byte * len`.
//!
//! One [`SharedCostModel`] per layer is the single source of truth: the
//! layer's devices answer [`crate::device::BlockDevice::cost`] from it, the
//! `Throttle` gRPC service publishes it, and the throttle's division is
//! checked against it. Changing it (an array that turns degraded costs more
//! per read) changes all three at once.
//!
//! `per_byte` is 16.16 fixed point (parity makes it fractional) and costs
//! are rounded up. Arithmetic saturates: a model from a peer is input like
//! any other, and an absurd one is refused by [`CostModel::from_wire`]
//! with a clear error rather than wrapping.

use std::sync::Arc;

use arc_swap::ArcSwap;
use nbdraid_proto::grpc;
use tokio::sync::watch;

use crate::device::OpKind;

/// Units every request costs regardless of its data: its bookkeeping and reply.
pub const BASE_COST: u64 = 512;

/// Units a BLOCK_STATUS reply may use at most (extents are bounded by the engine).
pub const BLOCK_STATUS_COST: u64 = 8 * 1024 + BASE_COST;

/// Fixed-point scale of `per_byte` (16.16): this value is one unit per byte.
pub const PER_BYTE_ONE: u64 = 1 << 16;

/// Largest `base` accepted from a published model (1 TiB of units).
pub const MAX_BASE: u64 = 1 << 40;

/// Largest `per_byte` accepted from a published model (1024 units per byte).
pub const MAX_PER_BYTE: u64 = 1024 * PER_BYTE_ONE;

/// One operation's cost: `base + ceil(per_byte * len / 2^16)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpCost {
    /// Units regardless of length.
    pub base: u64,
    /// Units per byte, 16.16 fixed point.
    pub per_byte: u64,
}

impl OpCost {
    /// Returns the cost of `len` bytes (rounded up, saturating).
    pub fn cost(&self, len: u64) -> u64 {
        let scaled = (self.per_byte as u128 * len as u128).div_ceil(PER_BYTE_ONE as u128);
        self.base
            .saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
    }

    /// Returns the sum of two costs (saturating): what a request costs when
    /// it costs both.
    pub fn plus(self, other: OpCost) -> OpCost {
        OpCost {
            base: self.base.saturating_add(other.base),
            per_byte: self.per_byte.saturating_add(other.per_byte),
        }
    }
}

/// A peer's published model that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// An operation name this layer does not know.
    #[error("unknown operation {0:?} in a cost model")]
    UnknownOp(String),
    /// A value beyond the bounds a sane layer publishes.
    #[error("cost of {op} is absurd (base {base}, per-byte {per_byte}/65536): refusing the model")]
    Absurd {
        /// The operation.
        op: &'static str,
        /// Its base.
        base: u64,
        /// Its per-byte cost.
        per_byte: u64,
    },
    /// An operation without a cost.
    #[error("the cost model has no entry for {0}")]
    Missing(&'static str),
}

/// A layer's cost model: its name and one [`OpCost`] per operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostModel {
    layer: String,
    ops: [OpCost; OpKind::ALL.len()],
}

impl CostModel {
    /// Returns the model of a layer that holds one buffer of the request's
    /// length for READ and WRITE, bookkeeping for everything else, and a
    /// bounded reply for BLOCK_STATUS (a storage node).
    pub fn buffers(layer: impl Into<String>) -> Self {
        let mut ops = [OpCost::default(); OpKind::ALL.len()];
        for op in OpKind::ALL {
            ops[op.index()] = match op {
                OpKind::Read | OpKind::Write => OpCost {
                    base: BASE_COST,
                    per_byte: PER_BYTE_ONE,
                },
                OpKind::BlockStatus => OpCost {
                    base: BLOCK_STATUS_COST,
                    per_byte: 0,
                },
                _ => OpCost {
                    base: BASE_COST,
                    per_byte: 0,
                },
            };
        }
        Self {
            layer: layer.into(),
            ops,
        }
    }

    /// Returns the layer's name.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// Returns the cost entry of `op`.
    pub fn op(&self, op: OpKind) -> OpCost {
        self.ops[op.index()]
    }

    /// Returns this model with `op`'s entry replaced.
    pub fn with_op(mut self, op: OpKind, cost: OpCost) -> Self {
        self.ops[op.index()] = cost;
        self
    }

    /// Returns the units a request of `op` over `len` bytes may use.
    pub fn cost(&self, op: OpKind, len: u64) -> u64 {
        self.ops[op.index()].cost(len)
    }

    /// Returns a model named `layer` that bounds both `self` and `other`:
    /// per operation the larger base and the larger per-byte cost.
    pub fn max_with(&self, other: &CostModel, layer: &str) -> CostModel {
        let mut ops = self.ops;
        for (a, b) in ops.iter_mut().zip(other.ops.iter()) {
            a.base = a.base.max(b.base);
            a.per_byte = a.per_byte.max(b.per_byte);
        }
        CostModel {
            layer: layer.to_string(),
            ops,
        }
    }

    /// Returns the model in its published (protobuf) form.
    pub fn to_wire(&self) -> Vec<grpc::OpCost> {
        OpKind::ALL
            .iter()
            .map(|&op| grpc::OpCost {
                op: op.name().into(),
                base: self.ops[op.index()].base,
                per_byte_fp: self.ops[op.index()].per_byte,
            })
            .collect()
    }

    /// Parses a peer's published model, refusing unknown operations,
    /// missing entries and absurd values.
    pub fn from_wire(layer: &str, costs: &[grpc::OpCost]) -> Result<Self, ModelError> {
        let mut ops: [Option<OpCost>; OpKind::ALL.len()] = [None; OpKind::ALL.len()];
        for c in costs {
            let op = OpKind::from_name(&c.op).ok_or_else(|| ModelError::UnknownOp(c.op.clone()))?;
            if c.base > MAX_BASE || c.per_byte_fp > MAX_PER_BYTE {
                return Err(ModelError::Absurd {
                    op: op.name(),
                    base: c.base,
                    per_byte: c.per_byte_fp,
                });
            }
            ops[op.index()] = Some(OpCost {
                base: c.base,
                per_byte: c.per_byte_fp,
            });
        }
        let mut out = [OpCost::default(); OpKind::ALL.len()];
        for op in OpKind::ALL {
            out[op.index()] = ops[op.index()].ok_or(ModelError::Missing(op.name()))?;
        }
        Ok(Self {
            layer: layer.to_string(),
            ops: out,
        })
    }
}

/// A layer's current cost model, shared by everything that reads it.
///
/// Cloning shares the same model; [`SharedCostModel::set`] replaces it for
/// every holder and wakes [`SharedCostModel::subscribe`]rs.
#[derive(Debug, Clone)]
pub struct SharedCostModel {
    model: Arc<ArcSwap<CostModel>>,
    changed: Arc<watch::Sender<u64>>,
}

impl SharedCostModel {
    /// Returns a shared handle holding `model`.
    pub fn new(model: CostModel) -> Self {
        Self {
            model: Arc::new(ArcSwap::from_pointee(model)),
            changed: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Returns the current model.
    pub fn load(&self) -> Arc<CostModel> {
        self.model.load_full()
    }

    /// Returns the units a request of `op` over `len` bytes may use now.
    pub fn cost(&self, op: OpKind, len: u64) -> u64 {
        self.model.load().cost(op, len)
    }

    /// Replaces the model (for every holder) and notifies subscribers.
    pub fn set(&self, model: CostModel) {
        self.model.store(Arc::new(model));
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Returns a receiver that sees a change each time the model is replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_model_costs() {
        let m = CostModel::buffers("node");
        assert_eq!(m.cost(OpKind::Read, 4096), BASE_COST + 4096);
        assert_eq!(m.cost(OpKind::Write, 0), BASE_COST);
        assert_eq!(m.cost(OpKind::Flush, 1 << 30), BASE_COST);
        assert_eq!(m.cost(OpKind::BlockStatus, 1 << 30), BLOCK_STATUS_COST);
    }

    #[test]
    fn fractional_costs_round_up_and_saturate() {
        let c = OpCost {
            base: 1,
            per_byte: PER_BYTE_ONE + PER_BYTE_ONE / 3, // 1.333.. per byte
        };
        assert_eq!(c.cost(3), 1 + 4);
        let huge = OpCost {
            base: u64::MAX - 1,
            per_byte: u64::MAX,
        };
        assert_eq!(huge.cost(u64::MAX), u64::MAX);
    }

    #[test]
    fn wire_round_trip_and_refusals() {
        let m = CostModel::buffers("x").with_op(
            OpKind::Write,
            OpCost {
                base: 7,
                per_byte: 3 * PER_BYTE_ONE,
            },
        );
        let back = CostModel::from_wire("x", &m.to_wire()).unwrap();
        assert_eq!(back, m);
        let mut wire = m.to_wire();
        wire[0].per_byte_fp = u64::MAX;
        assert!(matches!(
            CostModel::from_wire("x", &wire),
            Err(ModelError::Absurd { .. })
        ));
        let mut wire = m.to_wire();
        wire[1].op = "frobnicate".into();
        assert!(matches!(
            CostModel::from_wire("x", &wire),
            Err(ModelError::UnknownOp(_))
        ));
        let wire = m.to_wire()[1..].to_vec();
        assert_eq!(
            CostModel::from_wire("x", &wire),
            Err(ModelError::Missing("read"))
        );
    }

    #[test]
    fn shared_model_changes_for_every_holder() {
        let a = SharedCostModel::new(CostModel::buffers("n"));
        let b = a.clone();
        let rx = b.subscribe();
        a.set(CostModel::buffers("n").with_op(
            OpKind::Read,
            OpCost {
                base: 1,
                per_byte: 0,
            },
        ));
        assert_eq!(b.cost(OpKind::Read, 1 << 20), 1);
        assert!(rx.has_changed().unwrap());
    }
}
