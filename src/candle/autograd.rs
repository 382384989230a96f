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

#[cfg(feature = "candle-cuda")]
use candle_core::CudaStorage;
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
        [a, b, rest @ ..] if rest.len() > 1 => {
            let link = link(name, rest, node.stash.clone(), 2)?;
            a.apply_op3(b, &link, Op(node))
        }
        _ => apply(inputs, node),
    }
}

/// Applies `rule` to one, two or three inputs.
fn apply<R: Rule + 'static>(inputs: &[&Tensor], rule: R) -> candle_core::Result<Tensor> {
    match inputs {
        [a] => a.apply_op1(Op(rule)),
        [a, b] => a.apply_op2(b, Op(rule)),
        [a, b, c] => a.apply_op3(b, c, Op(rule)),
        _ => Err(candle_core::Error::msg(format!(
            "moerec {}: {} inputs for one custom op",
            rule.name(),
            inputs.len()
        ))),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> candle_core::Result<std::sync::MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| candle_core::Error::msg("moerec: a poisoned lock"))
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

/// What a custom op of this module does: its forward output (already
/// computed, or a zero) and its inputs' gradients.
trait Rule: Send + Sync {
    fn name(&self) -> &'static str;

    /// The output when the inputs live on the CPU.
    fn cpu_output(&self) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The output when the inputs live on `first`'s CUDA device.
    #[cfg(feature = "candle-cuda")]
    fn cuda_output(&self, first: &CudaStorage) -> candle_core::Result<(CudaStorage, Shape)>;

    /// The gradients of `args` from the output's gradient `grad`.
    fn gradients(&self, args: &[&Tensor], grad: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>>;
}

/// A [`Rule`] as a candle custom op of one, two or three inputs.
struct Op<R>(R);

/// `Op` as candle's custom op of the arity of the argument names given
/// (candle has one trait per arity, with the same three methods).
macro_rules! custom_op {
    ($trait:ident, $grads:ty, $first:ident $(, $rest:ident)*) => {
        impl<R: Rule> $trait for Op<R> {
            fn name(&self) -> &'static str {
                self.0.name()
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                $($rest: &CpuStorage, _: &Layout,)*
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                $(let _ = $rest;)*
                self.0.cpu_output()
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                first: &CudaStorage,
                _: &Layout,
                $($rest: &CudaStorage, _: &Layout,)*
            ) -> candle_core::Result<(CudaStorage, Shape)> {
                $(let _ = $rest;)*
                self.0.cuda_output(first)
            }

            // One input expands to `Ok((next()))`: a single gradient, no tuple.
            #[allow(clippy::double_parens)]
            fn bwd(
                &self,
                $first: &Tensor,
                $($rest: &Tensor,)*
                _: &Tensor,
                grad: &Tensor,
            ) -> candle_core::Result<$grads> {
                let mut grads = self.0.gradients(&[$first $(, $rest)*], grad)?.into_iter();
                let mut next = || grads.next().flatten();
                Ok((next() $(, { let _ = $rest; next() })*))
            }
        }
    };
}

custom_op!(CustomOp1, Option<Tensor>, a);
custom_op!(CustomOp2, (Option<Tensor>, Option<Tensor>), a, b);
custom_op!(CustomOp3, (Option<Tensor>, Option<Tensor>, Option<Tensor>), a, b, c);

/// The op's node: its computed output and its backward.
struct Node {
    name: &'static str,
    output: Mutex<Option<(Storage, Shape)>>,
    backward: Backward,
    stash: Stash,
    arity: usize,
}

impl Node {
    fn take_output(&self) -> candle_core::Result<(Storage, Shape)> {
        lock(&self.output)?
            .take()
            .ok_or_else(|| candle_core::Error::msg(format!("moerec {}: the output was already taken", self.name)))
    }

    fn misplaced(&self, expected: &str) -> candle_core::Error {
        candle_core::Error::msg(format!("moerec {}: the output is not on the {expected}", self.name))
    }
}

impl Rule for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_output(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cpu(storage), shape) => Ok((storage, shape)),
            _ => Err(self.misplaced("CPU")),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_output(&self, _: &CudaStorage) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.take_output()? {
            (Storage::Cuda(storage), shape) => Ok((storage, shape)),
            _ => Err(self.misplaced("CUDA device")),
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
            *lock(&self.stash)? = linked;
            grads.push(Some(args[2].zeros_like()?));
        }
        grads.into_iter().zip(args).map(|(g, input)| cast(g, input)).collect()
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
        [a, b, rest @ ..] if rest.len() > 1 => {
            let inner = link(name, rest, stash, first + 2)?;
            a.apply_op3(b, &inner, Op(Link { count: 2, ..op }))
        }
        [] => Err(candle_core::Error::msg(format!("moerec {name}: an empty link"))),
        _ => apply(inputs, op),
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

impl Rule for Link {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_output(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_output(&self, first: &CudaStorage) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = first.device.clone();
        let zero = device.alloc_zeros::<f32>(1)?;
        Ok((CudaStorage::wrap_cuda_slice(zero, device), Shape::from(1)))
    }

    fn gradients(&self, args: &[&Tensor], _: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut stash = lock(&self.stash)?;
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
