//! Compiles every `kernels/*.cu` to PTX with nvcc and embeds it.
//!
//! nvcc is looked up in `NVCC`, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then
//! `PATH`, then the venv that `scripts/install-nvcc.sh` creates. With none the
//! build still succeeds (a cargo warning) and the CUDA backend answers
//! `Error::KernelsNotCompiled`; `MOEREC_REQUIRE_NVCC=1` makes that a build
//! error. `MOEREC_PTX_ARCH` overrides the virtual target (default compute_80).
//! A kernel that fails to compile fails the build with nvcc's message.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_PTX_ARCH: &str = "compute_80";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "MOEREC_PTX_ARCH",
        "MOEREC_REQUIRE_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .expect("kernels/ exists")
        .map(|entry| entry.expect("readable kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();

    let require = env::var("MOEREC_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let modules = match find_nvcc(&manifest_dir) {
        Some(nvcc) => {
            let arch = env::var("MOEREC_PTX_ARCH").unwrap_or_else(|_| DEFAULT_PTX_ARCH.to_string());
            sources
                .iter()
                .map(|source| compile_ptx(&nvcc, &arch, &kernel_dir, source, &out_dir))
                .collect()
        }
        None if require => {
            panic!("MOEREC_REQUIRE_NVCC=1 but no nvcc was found (set NVCC, CUDA_HOME or run scripts/install-nvcc.sh)")
        }
        None => {
            println!(
                "cargo:warning=moerec: nvcc not found; CUDA kernels not compiled (the CUDA backend will report \
                 KernelsNotCompiled). Run scripts/install-nvcc.sh or set NVCC."
            );
            Vec::new()
        }
    };
    write_module_table(&out_dir, &modules, !sources.is_empty());
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(path));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            candidates.push(PathBuf::from(home).join("bin").join(exe));
        }
    }
    if let Some(paths) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&paths).map(|dir| dir.join(exe)));
    }
    let venv_lib = manifest_dir.join(".venv-cuda").join("lib");
    if let Ok(entries) = fs::read_dir(&venv_lib) {
        for entry in entries.flatten() {
            candidates.push(entry.path().join("site-packages/nvidia/cu13/bin").join(exe));
        }
    }
    candidates.into_iter().find(|path| path.is_file())
}

/// Returns (module name, PTX path).
fn compile_ptx(nvcc: &Path, arch: &str, kernel_dir: &Path, source: &Path, out_dir: &Path) -> (String, PathBuf) {
    let name = source
        .file_stem()
        .expect("a .cu file has a stem")
        .to_string_lossy()
        .into_owned();
    let ptx = out_dir.join(format!("{name}.ptx"));
    let output = Command::new(nvcc)
        .arg("-ptx")
        .arg(format!("-arch={arch}"))
        .args(["-O3", "-std=c++17"])
        .arg("-I")
        .arg(kernel_dir)
        .arg(source)
        .arg("-o")
        .arg(&ptx)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (name, ptx)
}

fn write_module_table(out_dir: &Path, modules: &[(String, PathBuf)], has_sources: bool) {
    let mut table = String::new();
    writeln!(
        table,
        "/// Whether build.rs compiled the kernels (false when nvcc was missing)."
    )
    .unwrap();
    writeln!(
        table,
        "pub const COMPILED: bool = {};",
        !modules.is_empty() && has_sources
    )
    .unwrap();
    writeln!(table, "/// (module name, PTX text), one per kernels/*.cu file.").unwrap();
    writeln!(table, "pub const MODULES: &[(&str, &str)] = &[").unwrap();
    for (name, ptx) in modules {
        writeln!(table, "    ({name:?}, include_str!({:?})),", ptx.display().to_string()).unwrap();
    }
    writeln!(table, "];").unwrap();
    fs::write(out_dir.join("kernels.rs"), table).expect("OUT_DIR is writable");
}
