//! Image token counts. A fixed count (LLaVA-style), or the Qwen2-VL rule computed from the
//! width and height in the file header; pixels are never decoded.

use crate::plan::ImagePlan;
use crate::render::{Message, Role};
use std::path::Path;

/// A sample whose text has no image placeholder gets one per image at the start of its
/// first user turn (the LLaVA convention); text that already places them is left alone.
pub fn place_images(messages: &mut [Message], placeholder: &str, count: usize) -> Result<(), String> {
    if count == 0 || messages.iter().any(|m| m.content.contains(placeholder)) {
        return Ok(());
    }
    let first_user = messages
        .iter_mut()
        .find(|m| m.role == Role::User)
        .ok_or_else(|| "the sample has images but no user turn to put them in".to_string())?;
    first_user.content.insert_str(0, &(placeholder.repeat(count) + "\n"));
    Ok(())
}

/// Qwen2-VL `smart_resize`: the (height, width) an image is resized to, multiples of
/// `factor` = patch × merge, with the pixel count kept within [min_pixels, max_pixels].
pub fn smart_resize(height: u64, width: u64, factor: u64, min_pixels: u64, max_pixels: u64) -> (u64, u64) {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    // Python's round() rounds half to even; match it exactly.
    let mut h_bar = ((h / f).round_ties_even() * f).max(f);
    let mut w_bar = ((w / f).round_ties_even() * f).max(f);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = ((h / beta / f).floor() * f).max(f);
        w_bar = ((w / beta / f).floor() * f).max(f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    (h_bar as u64, w_bar as u64)
}

/// Image tokens for an image of the given size under the plan's dynamic rule.
pub fn dynamic_count(plan: &ImagePlan, width: u64, height: u64) -> u32 {
    let factor = (plan.patch * plan.merge) as u64;
    let (h, w) = smart_resize(height, width, factor, plan.min_pixels, plan.max_pixels);
    ((h / plan.patch as u64) * (w / plan.patch as u64) / (plan.merge as u64 * plan.merge as u64)) as u32
}

/// Tokens for one image: the fixed count, or the dynamic count from its header.
pub fn image_tokens(plan: &ImagePlan, path: &Path) -> Result<u32, String> {
    // The header is read even for a fixed count: a missing or broken image is caught here,
    // with its source and row, not by the training job.
    let size = imagesize::size(path).map_err(|e| match e {
        imagesize::ImageError::IoError(io) => format!("cannot read image {}: {io}", path.display()),
        other => format!("cannot read the size of image {}: {other}", path.display()),
    })?;
    if size.width == 0 || size.height == 0 {
        return Err(format!("image {} has zero size", path.display()));
    }
    Ok(plan.count.unwrap_or_else(|| dynamic_count(plan, size.width as u64, size.height as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_qwen2_vl_examples() {
        // Values from the Qwen2-VL processor with patch 14, merge 2 (factor 28).
        assert_eq!(smart_resize(224, 224, 28, 56 * 56, 28 * 28 * 1280), (224, 224));
        assert_eq!(smart_resize(100, 300, 28, 56 * 56, 28 * 28 * 1280), (112, 308));
        let (h, w) = smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 1280);
        assert!(h * w <= 28 * 28 * 1280 && h % 28 == 0 && w % 28 == 0);
        let (h, w) = smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 1280);
        assert!(h * w >= 56 * 56);
    }

    #[test]
    fn dynamic_count_of_224_square_is_64() {
        let plan: ImagePlan = serde_json::from_str(r#"{"placeholder":"<image>","token":"<image>"}"#).unwrap();
        assert_eq!(dynamic_count(&plan, 224, 224), 64);
    }
}
