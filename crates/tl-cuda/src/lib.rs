//! The CUDA device: context and stream, device memory, the kernels of
//! `kernels.cu` compiled at run time by NVRTC for the card (PTX cached on
//! disk, keyed by source hash and architecture), cuBLAS, and CUDA graphs.
//!
//! Everything is loaded at run time (cudarc with dynamic loading), so one
//! binary built without a CUDA toolkit runs on machines with and without a
//! GPU. cudarc panics when a library is missing; [`probe`] checks for the
//! driver, NVRTC and cuBLAS first, and [`Gpu::new`] refuses with a clear
//! reason instead.
//!
//! The model code (tl-model's CUDA executor) drives this crate through raw
//! device pointers ([`DevBuf`]) and named kernel launches: that keeps the
//! launch path free of per-call bookkeeping, so a decode step can be
//! captured once as a graph and replayed.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::sys as drv;
use cudarc::driver::{result as drv_res, CudaContext, CudaEvent, CudaModule, CudaStream};

/// The kernel sources, compiled by NVRTC at first use.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// The largest by-value kernel argument (`Arg::Raw`) a launch takes, in
/// bytes.
pub const MAX_RAW_ARG: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA not available: {0}")]
    Unavailable(String),
    #[error("CUDA driver error in {op}: {err}")]
    Driver { op: String, err: String },
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("cuBLAS error in {op}: {err}")]
    Blas { op: String, err: String },
    #[error("no CUDA kernel named {0}")]
    NoKernel(String),
    #[error(
        "out of GPU memory: {what} needs {need} bytes, {free} of {total} bytes are free on {device}"
    )]
    OutOfMemory {
        what: String,
        need: usize,
        free: usize,
        total: usize,
        device: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "GPU work did not finish within {secs} s on {device} (last kernel launched: {last}); \
         the device is stuck and this process cannot use it any more"
    )]
    Timeout {
        secs: u64,
        device: String,
        last: String,
    },
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Driver errors after which the CUDA context is unusable: every later
/// call of the process fails too (the "sticky" errors of the CUDA driver
/// API: a kernel faulted, or the device itself did).
const FATAL_DRIVER_ERRORS: &[&str] = &[
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "CUDA_ERROR_DEVICE_UNAVAILABLE",
    "CUDA_ERROR_DEVICE_NOT_LICENSED",
    "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
];

impl CudaError {
    /// Whether the device (or this process's context on it) is lost: a
    /// stuck device, or a driver error that leaves the context unusable.
    /// Other errors (out of memory, a launch refused for its resources)
    /// fail one call and leave the device working.
    pub fn is_fatal(&self) -> bool {
        match self {
            CudaError::Timeout { .. } => true,
            CudaError::Driver { err, .. } | CudaError::Blas { err, .. } => {
                FATAL_DRIVER_ERRORS.iter().any(|c| err.contains(c))
            }
            _ => false,
        }
    }
}

fn drv_err(op: &str) -> impl FnOnce(drv_res::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver {
        op: op.to_string(),
        err: format!("{e:?}"),
    }
}

/// Checks that the CUDA driver, NVRTC and cuBLAS libraries can be loaded and
/// that a device exists, without letting cudarc panic.
pub fn probe() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries (libloading) and drop
    // the handles; no symbol is called.
    let (cu, rtc, blas) = unsafe {
        (
            drv::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            blas_sys::is_culib_present(),
        )
    };
    if !cu {
        return Err(CudaError::Unavailable(
            "the CUDA driver library (libcuda.so) could not be loaded: no NVIDIA driver on this machine"
                .into(),
        ));
    }
    if !rtc {
        return Err(CudaError::Unavailable(
            "the NVRTC library (libnvrtc.so) could not be loaded: install the CUDA runtime libraries"
                .into(),
        ));
    }
    if !blas {
        return Err(CudaError::Unavailable(
            "the cuBLAS library (libcublas.so) could not be loaded: install the CUDA runtime libraries"
                .into(),
        ));
    }
    drv_res::init().map_err(|e| CudaError::Unavailable(format!("cuInit failed: {e:?}")))?;
    let n = CudaContext::device_count()
        .map_err(|e| CudaError::Unavailable(format!("cannot count devices: {e:?}")))?;
    if n == 0 {
        return Err(CudaError::Unavailable("the driver reports no GPU".into()));
    }
    Ok(())
}

/// Number of CUDA devices, after a successful [`probe`].
pub fn device_count() -> Result<usize> {
    probe()?;
    CudaContext::device_count()
        .map(|n| n as usize)
        .map_err(drv_err("device_count"))
}

/// A device allocation, freed on drop. `ptr` is the raw device address.
#[derive(Debug)]
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevBuf {
    /// The address `off` bytes in.
    pub fn at(&self, off: usize) -> u64 {
        self.ptr + off as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: `ptr` came from `malloc_sync` in this context and is
            // freed once; errors on teardown can only be ignored.
            let _ = self.ctx.bind_to_thread();
            let _ = unsafe { drv_res::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (for fast, asynchronous read-back).
pub struct PinnedBuf {
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    pub fn as_slice<T: bytemuck_like::Pod>(&self) -> &[T] {
        // SAFETY: the allocation holds `bytes` bytes, page-aligned.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.bytes / size_of::<T>()) }
    }
    pub fn as_mut_slice<T: bytemuck_like::Pod>(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.bytes / size_of::<T>()) }
    }
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_host`, freed once.
        let _ = unsafe { drv_res::free_host(self.ptr) };
    }
}

/// Plain-old-data element types that may be viewed in pinned memory.
pub mod bytemuck_like {
    /// # Safety
    /// Every bit pattern is a valid value.
    pub unsafe trait Pod: Copy {}
    unsafe impl Pod for f32 {}
    unsafe impl Pod for i32 {}
    unsafe impl Pod for u32 {}
    unsafe impl Pod for u8 {}
}

/// One kernel argument, by value.
#[derive(Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    /// A `#[repr(C)]` struct passed by value, as its bytes.
    Raw(Vec<u8>),
}

/// The bytes of a `#[repr(C)]` value, as the kernels read the struct.
pub fn raw_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: reads the `size_of::<T>()` bytes of a `Copy` value; the
    // structs passed have no padding (4- and 8-byte fields, each aligned).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

/// Bytes of a `#[repr(C)]` value for [`Arg::Raw`].
pub fn raw_arg<T: Copy>(v: &T) -> Arg {
    Arg::Raw(raw_bytes(v).to_vec())
}

/// A captured CUDA graph, replayed with [`Gpu::replay`].
pub struct Graph {
    exec: drv::CUgraphExec,
    graph: drv::CUgraph,
}

// SAFETY: graph handles are driver objects usable from any thread bound to
// their context.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by `end_capture`/`instantiate`, destroyed once.
        unsafe {
            let _ = drv_res::graph::exec_destroy(self.exec);
            let _ = drv_res::graph::destroy(self.graph);
        }
    }
}

/// One GPU: context, stream, the compiled kernels and a cuBLAS handle.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    /// Each kernel's handle and its index in `kernels`.
    funcs: HashMap<String, (drv::CUfunction, usize)>,
    /// Kernel names in load order.
    kernels: Vec<String>,
    blas: blas_sys::cublasHandle_t,
    pub name: String,
    pub ordinal: usize,
    pub total_mem: usize,
    pub arch: (i32, i32),
    pub sm_count: usize,
    profile: std::sync::Mutex<Profile>,
    /// `TL_CUDA_TRACE=1`: every launch is printed and waited for.
    trace: bool,
    /// How long `sync` waits before giving up (`TL_CUDA_TIMEOUT` seconds).
    timeout: std::time::Duration,
    /// Index in `kernels` of the last kernel launched, plus one (0: none),
    /// for the timeout message.
    last: std::sync::atomic::AtomicUsize,
    /// Whether the stream is being captured into a graph.
    capturing: std::sync::atomic::AtomicBool,
    /// Kernels launched with programmatic dependent launch (sm_90+, unless
    /// `TL_CUDA_PDL=0`).
    pdl: bool,
}

/// Per-stage GPU time, from events recorded between stages
/// (`TL_CUDA_PROFILE=1`; a decode step is then captured afresh each time,
/// the events as nodes of its graph, so the times are those of a replay).
#[derive(Default)]
struct Profile {
    marks: Vec<(&'static str, CudaEvent)>,
    totals: Vec<(&'static str, f64, usize)>,
}

// SAFETY: the raw handles (functions, cuBLAS) belong to the context, which
// is bound to the calling thread before every use; launches are serialised
// on the one stream by the owner (`&self` methods only enqueue work).
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} #{})", self.name, self.ordinal)
    }
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TL_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tensorlogic").join("cuda"))
}

/// FNV-1a 64 of the source: a stable key across builds and runs.
fn source_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Gpu {
    /// Opens device `ordinal`, compiling (or loading from the disk cache)
    /// the kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        probe()?;
        let n = device_count()?;
        if ordinal >= n {
            return Err(CudaError::Unavailable(format!(
                "device cuda:{ordinal} requested, {n} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv_err("context"))?;
        // SAFETY: this crate synchronises through its single stream and
        // never relies on cudarc's per-slice events (it uses raw pointers).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv_err("stream"))?;
        let name = ctx.name().map_err(drv_err("device name"))?;
        let total_mem = ctx.total_mem().map_err(drv_err("total_mem"))?;
        let arch = ctx
            .compute_capability()
            .map_err(drv_err("compute capability"))?;
        let sm_count = ctx
            .attribute(drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv_err("SM count"))? as usize;
        let arch_s = format!("sm_{}{}", arch.0, arch.1);
        let ptx = Self::compile(&arch_s)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(drv_err("load module"))?;
        let kernels = kernel_names(KERNELS_CU);
        let mut funcs = HashMap::new();
        for (i, name) in kernels.iter().enumerate() {
            let f = module
                .load_function(name)
                .map_err(drv_err("load function"))?;
            funcs.insert(name.clone(), (f.cu_function(), i));
        }
        let trace = std::env::var("TL_CUDA_TRACE").is_ok_and(|v| v == "1");
        let timeout = std::time::Duration::from_secs(
            std::env::var("TL_CUDA_TIMEOUT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(120),
        );
        let mut blas: blas_sys::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: cublasCreate writes a handle; it is bound to our stream
        // and destroyed in Drop.
        unsafe {
            let st = blas_sys::cublasCreate_v2(&mut blas);
            if st != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Blas {
                    op: "create".into(),
                    err: format!("{st:?}"),
                });
            }
            blas_sys::cublasSetStream_v2(blas, stream.cu_stream() as _);
        }
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            _module: module,
            funcs,
            kernels,
            blas,
            name,
            ordinal,
            total_mem,
            arch,
            sm_count,
            profile: Default::default(),
            trace,
            timeout,
            last: Default::default(),
            capturing: Default::default(),
            pdl: arch.0 >= 9 && std::env::var("TL_CUDA_PDL").map_or(true, |v| v != "0"),
        }))
    }

    /// Where the toolkit's `cuda_fp16.h` is, if anywhere (NVRTC has no
    /// default search path for it).
    fn fp16_header_dir() -> Option<String> {
        ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(|d| format!("{d}/include"))
            .chain([
                "/usr/local/cuda/include".to_string(),
                "/usr/include".to_string(),
            ])
            .find(|d| std::path::Path::new(d).join("cuda_fp16.h").exists())
    }

    /// NVRTC's PTX for `arch` (`sm_90`), with the toolkit's fp16 header
    /// from `header_dir` or the kernels' own conversions. Needs NVRTC, not
    /// a GPU.
    pub fn compile_uncached(arch: &str, header_dir: Option<String>) -> Result<String> {
        let arch_static: &'static str = Box::leak(arch.to_string().into_boxed_str());
        let include_paths: Vec<String> = header_dir.into_iter().collect();
        // Without the headers the kernels use their own half conversions.
        let mut options = vec!["--std=c++17".to_string(), "-default-device".to_string()];
        if !include_paths.is_empty() {
            options.push("-DTL_FP16_HEADER".into());
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch_static),
            options,
            include_paths,
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS_CU, opts).map_err(|e| {
            CudaError::Compile {
                arch: arch.to_string(),
                log: format!("{e}"),
            }
        })?;
        Ok(ptx.to_src())
    }

    fn compile(arch: &str) -> Result<String> {
        let key = format!(
            "{:016x}-{arch}{}.ptx",
            source_hash(KERNELS_CU),
            if Self::fp16_header_dir().is_some() {
                "-h"
            } else {
                ""
            }
        );
        let path = cache_dir().map(|d| d.join(&key));
        if let Some(p) = &path {
            if let Ok(s) = std::fs::read_to_string(p) {
                return Ok(s);
            }
        }
        let src = Self::compile_uncached(arch, Self::fp16_header_dir())?;
        if let Some(p) = &path {
            // The cache is an optimisation: a read-only home still works.
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &src).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
        Ok(src)
    }

    /// Whether `TL_CUDA_TRACE=1` is on (every launch printed and waited
    /// for; callers must not capture graphs then).
    pub fn tracing(&self) -> bool {
        self.trace
    }

    /// Binds the context to the calling thread (cheap; call before work on
    /// a thread that did not create the device).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv_err("bind"))
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        drv_res::mem_get_info().map_err(drv_err("mem_get_info"))
    }

    /// Allocates `bytes` (at least 1) of device memory, checking free memory
    /// first so that a too-large request fails with both sizes named.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DevBuf> {
        self.bind()?;
        let bytes = bytes.max(1).next_multiple_of(256);
        let (free, total) = self.mem_info()?;
        if bytes > free {
            return Err(CudaError::OutOfMemory {
                what: what.to_string(),
                need: bytes,
                free,
                total,
                device: self.name.clone(),
            });
        }
        // SAFETY: a plain device allocation, owned by the returned DevBuf.
        let ptr = unsafe { drv_res::malloc_sync(bytes) }.map_err(|e| CudaError::OutOfMemory {
            what: format!("{what} ({e:?})"),
            need: bytes,
            free,
            total,
            device: self.name.clone(),
        })?;
        Ok(DevBuf {
            ptr,
            bytes,
            ctx: self.ctx.clone(),
        })
    }

    /// Allocates and zero-fills.
    pub fn alloc_zeroed(&self, bytes: usize, what: &str) -> Result<DevBuf> {
        let b = self.alloc(bytes, what)?;
        // SAFETY: `b` holds `b.bytes` bytes.
        unsafe { drv_res::memset_d8_sync(b.ptr, 0, b.bytes) }.map_err(drv_err("memset"))?;
        Ok(b)
    }

    /// Copies host bytes into a new device buffer (synchronously).
    pub fn upload(&self, data: &[u8], what: &str) -> Result<DevBuf> {
        let b = self.alloc(data.len(), what)?;
        // SAFETY: `b` holds at least `data.len()` bytes.
        unsafe { drv_res::memcpy_htod_sync(b.ptr, data) }.map_err(drv_err("upload"))?;
        Ok(b)
    }

    /// Asynchronous host-to-device copy on the stream. The host memory must
    /// stay unchanged until the stream passes this point (callers copy from
    /// buffers they keep until the next synchronisation).
    pub fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` points at device memory of at least `src.len()`
        // bytes (the caller's buffer sizing); `src` outlives the copy (see
        // above).
        unsafe { drv_res::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(drv_err("htod"))
    }

    /// Device-to-host copy; synchronises the stream first so that all work
    /// before it is done.
    pub fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: `src` holds at least `dst.len()` bytes (caller sizing).
        unsafe { drv_res::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(drv_err("dtoh"))?;
        self.sync()
    }

    /// Device-to-device copy on the stream.
    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: both ranges are device memory of `bytes` (caller sizing).
        unsafe { drv_res::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(drv_err("dtod"))
    }

    /// Page-locked host memory.
    pub fn pinned(&self, bytes: usize) -> Result<PinnedBuf> {
        self.bind()?;
        // SAFETY: plain pinned allocation, owned by the returned value.
        let ptr = unsafe { drv_res::malloc_host(bytes.max(64), 0) }.map_err(drv_err("pinned"))?;
        Ok(PinnedBuf {
            ptr,
            bytes: bytes.max(64),
        })
    }

    /// Waits for all work on the stream, at most `TL_CUDA_TIMEOUT` seconds
    /// (default 120): a kernel that never ends becomes an error naming the
    /// last kernel launched instead of a hang. Polls `cuStreamQuery`,
    /// spinning for the first 50 µs (a decode step's readback) and yielding
    /// after that.
    pub fn sync(&self) -> Result<()> {
        let t0 = std::time::Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: a query of our own live stream.
            let r = unsafe { drv::cuStreamQuery(self.stream.cu_stream()) };
            match r {
                drv::CUresult::CUDA_SUCCESS => return Ok(()),
                drv::CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    return Err(CudaError::Driver {
                        op: format!("synchronize (after kernel {})", self.last_kernel()),
                        err: format!("{e:?}"),
                    })
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
                continue;
            }
            let el = t0.elapsed();
            if el > self.timeout {
                // A kernel that never ends can't be stopped from the host:
                // freeing memory or destroying the context would wait for
                // it forever. Say so and end the process (a supervisor
                // restarts it) rather than hang.
                let e = CudaError::Timeout {
                    secs: self.timeout.as_secs(),
                    device: self.name.clone(),
                    last: self.last_kernel().to_string(),
                };
                eprintln!("tl: fatal: {e}");
                std::process::exit(70);
            }
            if el.as_micros() > 50 {
                std::thread::yield_now();
            }
        }
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let (f, idx) = *self
            .funcs
            .get(name)
            .ok_or_else(|| CudaError::NoKernel(name.to_string()))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // Each argument's bytes, kept alive across the call.
        let mut store: Vec<[u64; MAX_RAW_ARG / 8]> = Vec::with_capacity(args.len());
        for a in args {
            let mut slot = [0u64; MAX_RAW_ARG / 8];
            {
                // SAFETY: viewing a local [u64; MAX_RAW_ARG / 8] as bytes.
                let bytes: &mut [u8; MAX_RAW_ARG] =
                    unsafe { &mut *(slot.as_mut_ptr() as *mut [u8; MAX_RAW_ARG]) };
                match a {
                    Arg::Ptr(p) => bytes[..8].copy_from_slice(&p.to_ne_bytes()),
                    Arg::I32(v) => bytes[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::I64(v) => bytes[..8].copy_from_slice(&v.to_ne_bytes()),
                    Arg::F32(v) => bytes[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::Raw(r) => {
                        if r.len() > MAX_RAW_ARG {
                            return Err(CudaError::Invalid(format!(
                                "kernel {name}: a by-value argument of {} bytes ({MAX_RAW_ARG} at most)",
                                r.len()
                            )));
                        }
                        bytes[..r.len()].copy_from_slice(r)
                    }
                }
            }
            store.push(slot);
        }
        let mut params: Vec<*mut c_void> = store
            .iter_mut()
            .map(|s| s.as_mut_ptr() as *mut c_void)
            .collect();
        // SAFETY: `f` is a function of the loaded module; `params` points at
        // one value per kernel parameter, laid out as the kernel declares
        // them (the callers in tl-model pass them in declaration order),
        // alive until cuLaunchKernel returns (it copies them).
        if self.pdl {
            // Programmatic stream serialisation: the kernel may launch
            // while its predecessor drains (each kernel waits for its
            // predecessors with griddepcontrol.wait first; kernels.cu).
            let mut attr = drv::CUlaunchAttribute {
                id: drv::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: drv::CUlaunchAttributeValue {
                    programmaticStreamSerializationAllowed: 1,
                },
            };
            let cfg = drv::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as below; `cfg` and `attr` outlive the call.
            let r = unsafe {
                drv::cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut())
            };
            if r != drv::CUresult::CUDA_SUCCESS {
                return Err(CudaError::Driver {
                    op: format!("launch {name}"),
                    err: format!("{r:?}"),
                });
            }
        } else {
            unsafe {
                drv_res::launch_kernel(
                    f,
                    grid,
                    (block, 1, 1),
                    smem,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(|e| CudaError::Driver {
                op: format!("launch {name}"),
                err: format!("{e:?}"),
            })?;
        }
        self.last
            .store(idx + 1, std::sync::atomic::Ordering::Relaxed);
        if self.trace {
            let t0 = std::time::Instant::now();
            eprintln!(
                "tl-cuda: launch {name} grid {grid:?} block {block} smem {smem} args {args:?}"
            );
            let r = self.sync();
            eprintln!(
                "tl-cuda:   {name} {} in {:.3} ms",
                if r.is_ok() { "done" } else { "FAILED" },
                t0.elapsed().as_secs_f64() * 1e3
            );
            r?;
        }
        Ok(())
    }

    /// Records a timing event: the GPU time until the next mark is charged
    /// to `label`.
    pub fn mark(&self, label: &'static str) -> Result<()> {
        let ev = self
            .ctx
            .new_event(Some(drv::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv_err("event"))?;
        // While the stream is being captured, "external" makes the record a
        // node of the graph (timed on every replay) instead of a
        // capture-internal dependency; the flag is invalid outside capture.
        let flags = if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            drv::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32
        } else {
            0
        };
        // SAFETY: an event of this context recorded on our stream.
        let r =
            unsafe { drv::cuEventRecordWithFlags(ev.cu_event(), self.stream.cu_stream(), flags) };
        if r != drv::CUresult::CUDA_SUCCESS {
            return Err(CudaError::Driver {
                op: "event record".into(),
                err: format!("{r:?}"),
            });
        }
        if let Ok(mut p) = self.profile.lock() {
            p.marks.push((label, ev));
        }
        Ok(())
    }

    /// Adds the intervals between the marks recorded so far to the totals
    /// (synchronises).
    pub fn profile_flush(&self) -> Result<()> {
        let Ok(mut p) = self.profile.lock() else {
            return Ok(());
        };
        let marks = std::mem::take(&mut p.marks);
        for w in marks.windows(2) {
            let ms = w[0]
                .1
                .elapsed_ms(&w[1].1)
                .map_err(drv_err("event elapsed"))? as f64;
            match p.totals.iter_mut().find(|t| t.0 == w[0].0) {
                Some(t) => {
                    t.1 += ms;
                    t.2 += 1;
                }
                None => p.totals.push((w[0].0, ms, 1)),
            }
        }
        Ok(())
    }

    /// The per-label totals so far, largest first: (label, ms, count).
    pub fn profile_report(&self) -> Vec<(&'static str, f64, usize)> {
        let mut t = self
            .profile
            .lock()
            .map(|p| p.totals.clone())
            .unwrap_or_default();
        t.sort_by(|a, b| b.1.total_cmp(&a.1));
        t
    }

    /// The name of the last kernel launched (`(none)` before the first).
    fn last_kernel(&self) -> &str {
        let i = self.last.load(std::sync::atomic::Ordering::Relaxed);
        i.checked_sub(1)
            .and_then(|i| self.kernels.get(i))
            .map_or("(none)", String::as_str)
    }

    /// Raises a kernel's dynamic shared-memory limit.
    pub fn set_max_smem(&self, name: &str, bytes: u32) -> Result<()> {
        let (f, _) = *self
            .funcs
            .get(name)
            .ok_or_else(|| CudaError::NoKernel(name.to_string()))?;
        // SAFETY: a valid function handle; attribute setting only.
        unsafe {
            drv_res::function::set_function_attribute(
                f,
                drv::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(drv_err("set smem"))
    }

    /// Row-major `c[m, n] = a[m, k] · b[n, k]ᵀ` with f16 inputs, f32
    /// accumulation and f32 output (cuBLAS GemmEx on tensor cores).
    #[allow(clippy::too_many_arguments)] // the GEMM's shape, three pointers and a stride
    pub fn gemm_f16_nt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: cᵀ[n, m] = b[n, k] · a[m, k]ᵀ, i.e. op(B) = Bᵀ
        // of the column-major [k, n] B.
        // SAFETY: the pointers are device buffers of the stated shapes
        // (caller sizing); cuBLAS runs on our stream.
        let st = unsafe {
            blas_sys::cublasGemmEx(
                self.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                k as i32,
                a as *const c_void,
                blas_sys::cudaDataType_t::CUDA_R_16F,
                k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                ldc as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if st != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(CudaError::Blas {
                op: format!("gemm {m}x{n}x{k}"),
                err: format!("{st:?}"),
            });
        }
        Ok(())
    }

    /// Starts capturing the stream's work into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: our stream; ended by `end_capture`.
        unsafe {
            drv_res::stream::begin_capture(
                self.stream.cu_stream(),
                drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            )
        }
        .map_err(drv_err("begin capture"))?;
        self.capturing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Ends a capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<Graph> {
        // SAFETY: ends the capture begun by `begin_capture` on our stream.
        let graph = unsafe { drv_res::stream::end_capture(self.stream.cu_stream()) };
        self.capturing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let graph = graph.map_err(drv_err("end capture"))?;
        if graph.is_null() {
            return Err(CudaError::Invalid("graph capture produced no graph".into()));
        }
        // SAFETY: a graph just captured.
        let exec = unsafe { drv_res::graph::instantiate(graph, drv::CUgraphInstantiate_flags(0)) }
            .map_err(drv_err("instantiate graph"))?;
        Ok(Graph { exec, graph })
    }

    /// Replays a captured graph on the stream.
    pub fn replay(&self, g: &Graph) -> Result<()> {
        // SAFETY: an instantiated graph of this context.
        unsafe { drv_res::graph::launch(g.exec, self.stream.cu_stream()) }
            .map_err(drv_err("graph launch"))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            blas_sys::cublasDestroy_v2(self.blas);
        }
    }
}

/// The `extern "C" __global__` kernel names of a source.
fn kernel_names(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in src.lines() {
        let l = line.trim_start();
        if let Some(rest) = l.strip_prefix("extern \"C\" __global__ void ") {
            if let Some(name) = rest.split('(').next() {
                // The GEMV_Q and MMQ macros' own template lines (`name##_1`,
                // `name`) are not kernels; their expansions are added below.
                if !name.contains('#') && name.trim() != "name" {
                    out.push(name.trim().to_string());
                }
            }
        }
        // Names generated by the GEMV_Q macro.
        if let Some(rest) = l.strip_prefix("GEMV_Q(") {
            if let Some(base) = rest.split(',').next() {
                for m in 1..=8 {
                    out.push(format!("{}_{m}", base.trim()));
                }
                out.push(format!("{}_id", base.trim()));
            }
        }
        // ... and by MMQ and MMQS, one kernel each.
        if let Some(rest) = l.strip_prefix("MMQ(").or_else(|| l.strip_prefix("MMQS(")) {
            if let Some(base) = rest.split(',').next() {
                out.push(base.trim().to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_driver_errors_are_fatal() {
        let drv = |e: &str| CudaError::Driver {
            op: "sync".into(),
            err: e.into(),
        };
        assert!(
            drv("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")").is_fatal()
        );
        assert!(
            drv("DriverError(CUDA_ERROR_LAUNCH_FAILED, \"unspecified launch failure\")").is_fatal()
        );
        assert!(
            !drv("DriverError(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, \"too many resources\")")
                .is_fatal()
        );
        assert!(!drv("DriverError(CUDA_ERROR_INVALID_VALUE, \"invalid argument\")").is_fatal());
        let t = CudaError::Timeout {
            secs: 10,
            device: "gpu".into(),
            last: "attention_64".into(),
        };
        assert!(t.is_fatal());
        assert!(!CudaError::Unavailable("no driver".into()).is_fatal());
    }

    #[test]
    fn kernel_names_found() {
        let names = kernel_names(KERNELS_CU);
        for n in [
            "gemv_q8_0_1",
            "gemv_q6_k_8",
            "gemv_f16_3",
            "mmq_q8_0",
            "mmq_q5_k",
            "mmqs_q8_0",
            "mmqs_q6_k",
            "attention_128",
            "qkv_rope_store",
            "rms_norm",
            "argmax_part",
            "argmax_final",
            "sample_phase",
            "fa_prefill_128",
            "quant_q8",
            "gemv_q4_k_id",
            "gemv_f16_id",
            "moe_route",
            "moe_combine",
            "norm_part",
            "expert_bias",
            "add_bias",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
        assert!(names.iter().all(|n| !n.contains('#')), "{names:?}");
    }

    /// The kernels compile with NVRTC for Hopper and Ampere, with the
    /// toolkit's fp16 header and with the kernels' own conversions. Needs
    /// only NVRTC (e.g. the `nvidia-cuda-nvrtc` wheel's lib on
    /// LD_LIBRARY_PATH), not a GPU; skipped with a message without it.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("SKIPPED kernels_compile_with_nvrtc: libnvrtc could not be loaded");
            return;
        }
        for arch in ["sm_90", "sm_80"] {
            let ptx = Gpu::compile_uncached(arch, None).unwrap_or_else(|e| panic!("{e}"));
            // TL_CUDA_PTX_OUT=DIR keeps the PTX (to inspect it with ptxas -v).
            if let Some(d) = std::env::var_os("TL_CUDA_PTX_OUT") {
                let _ = std::fs::write(
                    std::path::Path::new(&d).join(format!("kernels-{arch}.ptx")),
                    &ptx,
                );
            }
            for name in kernel_names(KERNELS_CU) {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{arch}: {name} missing"
                );
            }
            if let Some(dir) = Gpu::fp16_header_dir() {
                Gpu::compile_uncached(arch, Some(dir)).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn probe_never_panics() {
        // On a machine without a driver this is an error naming the reason;
        // with one, Ok. Either way no panic.
        match probe() {
            Ok(()) => {}
            Err(e) => assert!(e.to_string().starts_with("CUDA not available")),
        }
    }
}
