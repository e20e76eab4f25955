//! Weights as buffers over their file's mapped pages, with the binary's allocator installed.
//! One test: the mapped-file count is process-wide.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ldm::mapped_memory::{
    collecting_mappings, mapped_file_count, MappedFile, MappingAwareAllocator,
};
use ldm::weights_file::WeightsFile;

#[global_allocator]
static ALLOCATOR: MappingAwareAllocator = MappingAwareAllocator;

#[test]
fn weights_are_mapped_copy_on_write_and_unmapped_with_their_last_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let device = Device::Cpu;
    let weight = Tensor::arange(0f32, 4096., &device)
        .unwrap()
        .reshape((64, 64))
        .unwrap();
    let half = Tensor::new(&[1.5f32, -2.25], &device)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let tensors = HashMap::from([("w".to_string(), weight.clone()), ("h".to_string(), half)]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let file_bytes = std::fs::read(&path).unwrap();

    let vb = WeightsFile::open(&path)
        .unwrap()
        .into_var_builder(DType::F32, &device)
        .unwrap();
    // The f32 tensor is mapped (the f16 one was converted to a heap buffer): the file stays
    // mapped after the loader is gone, while the builder holds the tensor.
    assert_eq!(mapped_file_count(), 1);
    let read = vb.get((64, 64), "w").unwrap();
    assert_eq!(
        read.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        weight.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        vb.get(2, "h").unwrap().to_vec1::<f32>().unwrap(),
        [1.5, -2.25]
    );

    // Writing into a mapped buffer changes this process's copy only, never the file.
    let zeros = Tensor::zeros((1, 64), DType::F32, &device).unwrap();
    read.slice_set(&zeros, 0, 0).unwrap();
    assert_eq!(
        read.get(0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert_eq!(std::fs::read(&path).unwrap(), file_bytes);

    drop(vb);
    assert_eq!(
        mapped_file_count(),
        1,
        "a tensor still points into the file"
    );
    drop(read);
    assert_eq!(mapped_file_count(), 0, "the last tensor unmapped the file");

    // A mapped buffer that grows moves to the heap and lets go of the mapping.
    let file = std::fs::File::open(&path).unwrap();
    let mapped = MappedFile::map(&file, file_bytes.len()).unwrap();
    let mut bytes: Vec<u8> = mapped.vec(0, 16).unwrap();
    assert!(
        mapped.vec::<u8>(8, 16).is_none(),
        "bytes already handed out are not handed out again"
    );
    assert!(mapped.vec::<u32>(1, 1).is_none(), "misaligned");
    assert!(
        mapped.vec::<u8>(file_bytes.len() - 1, 2).is_none(),
        "past the end"
    );
    drop(mapped);
    assert_eq!(mapped_file_count(), 1);
    bytes.extend_from_slice(&[7; 4096]);
    assert_eq!(mapped_file_count(), 0);
    assert_eq!(&bytes[..16], &file_bytes[..16]);
    assert_eq!(bytes.len(), 16 + 4096);

    pages_of_a_freed_tensor_leave_the_process(dir.path());
    dropped_pages_read_back_from_the_file(dir.path());
}

/// A mapped file's pages taken out of resident memory (a pipeline's U-Net before decoding)
/// leave the process and read back unchanged when its tensors are used again.
fn dropped_pages_read_back_from_the_file(dir: &std::path::Path) {
    const MIB: usize = 1 << 20;
    let path = dir.join("dropped.safetensors");
    let device = Device::Cpu;
    let count = 8 * MIB; // 32 MiB of f32, every value distinct and exact
    let values = Tensor::arange(0f32, count as f32, &device).unwrap();
    let expected = values.to_vec1::<f32>().unwrap();
    candle_core::safetensors::save(&HashMap::from([("v".to_string(), values)]), &path).unwrap();

    let (file, pages) = collecting_mappings(|| WeightsFile::open(&path).unwrap());
    assert_eq!(pages.len(), 1, "the one file mapped while collecting");
    let tensor = file.load("v", &device).unwrap();
    drop(file);
    assert_eq!(tensor.to_vec1::<f32>().unwrap(), expected);
    let resident = resident_file_bytes();
    assert!(resident >= 32 * MIB, "{resident} bytes");

    // SAFETY: nothing in this file was written in place.
    unsafe { pages[0].drop_resident() };
    let dropped = resident_file_bytes();
    assert!(
        resident - dropped >= 31 * MIB,
        "file pages resident before {resident}, after {dropped}"
    );
    assert_eq!(tensor.to_vec1::<f32>().unwrap(), expected, "read back");

    drop(tensor);
    assert_eq!(mapped_file_count(), 1, "the handle keeps the file mapped");
    drop(pages);
    assert_eq!(mapped_file_count(), 0);
}

/// A weight freed while its file stays mapped (replaced by a quantized copy at load) stops
/// counting in the process's resident memory; one loaded twice is a copy the second time.
fn pages_of_a_freed_tensor_leave_the_process(dir: &std::path::Path) {
    const MIB: usize = 1 << 20;
    let path = dir.join("large.safetensors");
    let device = Device::Cpu;
    let large = Tensor::ones(32 * MIB / 4, DType::F32, &device).unwrap();
    let small = Tensor::ones(16, DType::F32, &device).unwrap();
    let tensors = HashMap::from([("large".to_string(), large), ("small".to_string(), small)]);
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let file = WeightsFile::open(&path).unwrap();
    let small = file.load("small", &device).unwrap();
    let large = file.load("large", &device).unwrap();
    let again = file.load("large", &device).unwrap();
    drop(file);
    let sum = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(sum(&large), (8 * MIB) as f32);
    let mapped_resident = resident_file_bytes();
    assert!(mapped_resident >= 32 * MIB, "{mapped_resident} bytes");
    // The second load of a tensor is its own heap copy: writing it leaves the first unchanged.
    again
        .slice_set(&Tensor::zeros(4, DType::F32, &device).unwrap(), 0, 0)
        .unwrap();
    assert_eq!(sum(&large), (8 * MIB) as f32);

    drop(large);
    assert_eq!(
        mapped_file_count(),
        1,
        "the small tensor keeps the file mapped"
    );
    let after = resident_file_bytes();
    assert!(
        mapped_resident - after >= 31 * MIB,
        "file pages resident before {mapped_resident}, after {after}"
    );
    assert_eq!(sum(&small), 16.0);
    drop(small);
    assert_eq!(mapped_file_count(), 0);
}

/// The bytes of mapped files resident in this process (`RssFile` in /proc/self/status).
fn resident_file_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("RssFile:"))
        .unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}
