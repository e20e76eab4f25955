//! Reading safetensors weights without memory mapping.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ldm::weights_file::WeightsFile;

#[test]
fn tensors_round_trip_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let device = Device::Cpu;
    let weight = Tensor::arange(0f32, 24., &device)
        .unwrap()
        .reshape((2, 3, 4))
        .unwrap();
    let half = Tensor::new(&[1.5f32, -2.25], &device)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let tensors = HashMap::from([
        ("a.weight".to_string(), weight.clone()),
        ("b".to_string(), half),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let vb = WeightsFile::open(&path)
        .unwrap()
        .into_var_builder(DType::F32, &device)
        .unwrap();
    let read = vb.get((2, 3, 4), "a.weight").unwrap();
    assert_eq!(
        read.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        (0..24).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(
        vb.get(2, "b").unwrap().to_vec1::<f32>().unwrap(),
        [1.5, -2.25]
    );
    assert!(vb.contains_tensor("b") && !vb.contains_tensor("c"));
    let missing = vb.get(2, "c").unwrap_err().to_string();
    assert!(missing.contains("c"), "{missing}");
    let misshapen = vb.get((4, 6), "a.weight").unwrap_err().to_string();
    assert!(misshapen.contains("a.weight"), "{misshapen}");

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let truncated = WeightsFile::open(&path).err().unwrap();
    assert!(
        format!("{truncated:#}").contains("outside the file"),
        "{truncated:#}"
    );
    std::fs::write(&path, b"not a weights file at all").unwrap();
    let garbage = WeightsFile::open(&path).err().unwrap();
    assert!(
        format!("{garbage:#}").contains("not a safetensors file"),
        "{garbage:#}"
    );
}
