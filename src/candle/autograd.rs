//! One autograd node for an op with any number of differentiable inputs.
//!
//! candle's custom ops take at most three inputs and compute their forward
//! inside the call. moerec's ops compute several outputs at once and take up
//! to four differentiable inputs, so the forward runs first (on borrowed
//! storage) and [`attach`] only hands its output to candle, without a copy,
//! inside a custom op whose backward is the op's backward. Inputs beyond the
//! third hang off a one-element link tensor: the node's backward computes
//! every gradient once and leaves those of the linked inputs in a shared
//! stash, which the link's backward (run after it: the link is an ancestor)
//! hands to candle.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// The gradients of an op's inputs, in the order the inputs were attached,
/// from the gradient of its output. `None` for an input with no gradient.
pub(crate) type Backward = Box<dyn Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync>;

type Stash = Arc<Mutex<Vec<Option<Tensor>>>>;

/// Puts the already computed `output` (of `shape`) on candle's tape as a
/// function of `inputs`, with `backward` as its gradient.
pub(crate) fn attach(
    name: &'static str,
    output: Storage,
    shape: Shape,
    inputs: &[&Tensor],
    backward: Backward,
) -> candle_core::Result<Tensor> {
    let node = Node {
        name,
        output: Mutex::new(Some((output, shape))),
        backward,
        stash: Arc::new(Mutex::new(Vec::new())),
        arity: inputs.len(),
    };
    match inputs {
        [] => Err(candle_core::Error::msg(format!("moerec {name}: no input to attach"))),
        [a] => a.apply_op1(node),
        [a, b] => a.apply_op2(b, node),
        [a, b, c] => a.apply_op3(b, c, node),
        [a, b, rest @ ..] => {
            let link = link(name, rest, node.stash.clone(), 2)?;
            a.apply_op3(b, &link, node)
        }
    }
}

/// Converts a gradient to its input's element type (moerec's are f32).
fn cast(grad: Option<Tensor>, input: &Tensor) -> candle_core::Result<Option<Tensor>> {
    grad.map(|g| {
        if g.dtype() == input.dtype() {
            Ok(g)
        } else {
            g.to_dtype(input.dtype())
        }
    })
    .transpose()
}

struct Node {
    name: &'static str,
    output: Mutex<Option<(Storage, Shape)>>,
    backward: Backward,
    stash: Stash,
    arity: usize,
}

impl Node {
    fn take_output(&self) -> candle_core::Result<(Storage, Shape)> {
        self.output
            .lock()
            .map_err(|_| candle_core::Error::msg("moerec: a poisoned lock"))?
            .take()
            .ok_or_else(|| candle_core::Error::msg(format!("moerec {}: the output was already taken", self.name)))
    }

    fn cpu_output(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cpu(storage), shape) => Ok((storage, shape)),
            _ => Err(candle_core::Error::msg(format!(
                "moerec {}: output not on the CPU",
                self.name
            ))),
        }
    }

    /// All gradients; those past the second are stashed for the link when
    /// there are more than three inputs.
    fn gradients(&self, args: &[&Tensor], grad: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut grads = (self.backward)(grad)?;
        if grads.len() != self.arity {
            return Err(candle_core::Error::msg(format!(
                "moerec {}: backward gave {} gradients for {} inputs",
                self.name,
                grads.len(),
                self.arity
            )));
        }
        if self.arity > 3 {
            let linked = grads.split_off(2);
            *self
                .stash
                .lock()
                .map_err(|_| candle_core::Error::msg("moerec: a poisoned lock"))? = linked;
            grads.push(Some(args[2].zeros_like()?));
        }
        grads.into_iter().zip(args).map(|(g, input)| cast(g, input)).collect()
    }
}

impl CustomOp1 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    fn bwd(&self, a: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.gradients(&[a], grad)?.pop().flatten())
    }
}

impl CustomOp2 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.gradients(&[a, b], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten()))
    }
}

impl CustomOp3 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.gradients(&[a, b, c], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), grads.next().flatten()))
    }
}

/// A one-element f32 tensor that depends on `inputs` (at most three here;
/// more chain through another link) and whose backward hands out their
/// stashed gradients, `first` being the stash index of `inputs[0]`.
fn link(name: &'static str, inputs: &[&Tensor], stash: Stash, first: usize) -> candle_core::Result<Tensor> {
    let op = Link {
        name,
        stash: stash.clone(),
        first,
        count: inputs.len().min(3),
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        [a, b, rest @ ..] => {
            let inner = link(name, rest, stash, first + 2)?;
            a.apply_op3(b, &inner, Link { count: 2, ..op })
        }
        [] => Err(candle_core::Error::msg(format!("moerec {name}: an empty link"))),
    }
}

struct Link {
    name: &'static str,
    stash: Stash,
    first: usize,
    /// How many of the link's inputs have stashed gradients; a third input
    /// beyond them is the next link.
    count: usize,
}

impl Link {
    fn zero() -> (CpuStorage, Shape) {
        (CpuStorage::F32(vec![0.0]), Shape::from(1))
    }

    fn gradients(&self, args: &[&Tensor]) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut stash = self
            .stash
            .lock()
            .map_err(|_| candle_core::Error::msg("moerec: a poisoned lock"))?;
        // The node stashed from index 2 on.
        let base = self.first - 2;
        let mut grads = Vec::with_capacity(args.len());
        for (i, input) in args.iter().enumerate() {
            let grad = if i < self.count {
                let slot = stash.get_mut(base + i).ok_or_else(|| {
                    candle_core::Error::msg(format!("moerec {}: a linked gradient is missing", self.name))
                })?;
                cast(slot.take(), input)?
            } else {
                Some(input.zeros_like()?)
            };
            grads.push(grad);
        }
        Ok(grads)
    }
}

impl CustomOp1 for Link {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok(Link::zero())
    }

    fn bwd(&self, a: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.gradients(&[a])?.pop().flatten())
    }
}

impl CustomOp2 for Link {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok(Link::zero())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.gradients(&[a, b])?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten()))
    }
}

impl CustomOp3 for Link {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok(Link::zero())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.gradients(&[a, b, c])?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), grads.next().flatten()))
    }
}
